"""effc's compiler: backend entry, options, pass manager, graph helpers, report, dumper, lowering.

Modules are imported directly (`effc.compiler.backend`, ...); this package imports nothing so
passes can use its helpers without import cycles.
"""
