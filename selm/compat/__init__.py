"""Small, tested patches that keep third-party packages working with the stack we pin (DESIGN.md §3)."""
