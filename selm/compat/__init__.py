"""Small, tested patches that keep third-party packages working with the stack we pin (docs/DESIGN.md §3)."""
