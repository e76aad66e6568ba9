"""The ordered list of graph passes the backend runs on a Dynamo (torch IR) graph."""

from __future__ import annotations

import logging

import torch.fx as fx
from chipmunk_compile.passes.replace_attention import replace_attention
from chipmunk_compile.passes.replace_mlp import replace_mlp
from chipmunk_compile.passes.sites import Plan

from chipmunk_compile.config import ChipmunkConfig

log = logging.getLogger("chipmunk_compile")


def run_passes(gm: fx.GraphModule, config: ChipmunkConfig, cudagraphs: bool = False) -> Plan:
    """Rewrite attention, then MLP sites of ``gm`` in place; return what was found.

    ``cudagraphs``: the graph will run under CUDA graphs (``mode="reduce-overhead"``), where every op call
    splits the graphs: no MLP selection is placed ahead of its call.

    Attention runs first so that the single-stream MLP rewrite (``cat([attn_out, mlp_act])``) sees the
    attention op as an ordinary producer.
    """
    plan = Plan()
    replace_attention(gm, config.attention, plan)
    replace_mlp(gm, config.mlp, plan, early_selection=config.mlp.early_selection and not cudagraphs)
    gm.graph.lint()
    gm.recompile()
    for site in plan.sites:
        if site.status == "dense":
            log.info("chipmunk: %s site %s left dense: %s", site.kind, site.name, site.reason)
    return plan
