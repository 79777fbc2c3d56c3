"""exactq.distributed: full-graph training on a partitioned graph over ``torch.distributed``, with
quantized halo exchange (AdaQP).

    parts = exactq.distributed.partition(data.edge_index, data.num_nodes, world_size)   # METIS
    shard = exactq.distributed.shard(data, parts, rank)        # or load_shard(directory, rank)
    model = exactq.distributed.wrap(GCN(...), shard, message_bits=2)
    out = model(shard.x, shard.edge_index)                      # rows of the owned nodes

Layers, bottom up: :mod:`.partition` (METIS / random) -> :mod:`.shard` (a rank's nodes, edges and
exchange plan) -> :mod:`.exchange` (messages packed by exactq's quantizer, the halo autograd function)
and :mod:`.aggregate` (sum / mean over owned and per-peer halo column ranges) -> :mod:`.model` (wrap:
layers, batch norm, gradient sum) and :mod:`.adaptive` (bits per link) -> :mod:`.launch` (local
processes) and :mod:`.train` (the training entry point for torchrun).
"""
from .exchange import MESSAGE_BITS, ExchangeStats, message_nbytes
from .launch import spawn
from .model import SUPPORTED_AGGREGATIONS, SUPPORTED_LAYERS, exchange_stats, unwrap, wrap
from .partition import partition, partition_stats
from .shard import ExchangePlan, GraphShard, load_shard, save_partition, shard

__all__ = ["MESSAGE_BITS", "SUPPORTED_AGGREGATIONS", "SUPPORTED_LAYERS", "ExchangePlan", "ExchangeStats",
           "GraphShard", "exchange_stats", "load_shard", "message_nbytes", "partition", "partition_stats", "save_partition", "shard", "spawn",
           "unwrap", "wrap"]
