"""An out-of-tree PEFT method (IA³) that registers with peftfleet through an entry point."""
