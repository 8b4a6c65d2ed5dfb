"""Custom ops of effc: one module per kernel family (Triton kernel + torch reference + registration)."""
