"""The pass registry: spec name -> pass class (explicit, no discovery)."""
from rewrite.passes.allocate import AllocatePass
from rewrite.passes.combine import CombinePass
from rewrite.passes.fuse import FusePass
from rewrite.passes.insert import InsertPass
from rewrite.passes.load import LoadPass
from rewrite.passes.merge import MergePass
from rewrite.passes.prune import PrunePass
from rewrite.passes.save import SavePass
from rewrite.passes.train import TrainPass
from rewrite.passes.unmerge import UnmergePass

REGISTRY = {p.name: p for p in (InsertPass, LoadPass, MergePass, UnmergePass, SavePass, TrainPass, AllocatePass,
                                CombinePass, PrunePass, FusePass)}

__all__ = ["REGISTRY", "AllocatePass", "CombinePass", "FusePass", "InsertPass", "LoadPass", "MergePass", "PrunePass",
           "SavePass", "TrainPass", "UnmergePass"]
