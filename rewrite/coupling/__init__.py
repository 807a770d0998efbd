"""Coupling analysis for structural pruning: which weight channels must be cut together (`analyze`), and the cut
itself (`remove`). labels.py traces channel ids through the graph, groups.py turns ties into units and groups,
remove.py slices weights, adapters and shape constants (METHODS.md §3.3)."""
from rewrite.coupling.groups import AdapterAxis, Coupling, Cut, Group, Unit, analyze
from rewrite.coupling.remove import Removal, remove

__all__ = ["AdapterAxis", "Coupling", "Cut", "Group", "Removal", "Unit", "analyze", "remove"]
