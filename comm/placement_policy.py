"""The placement policies of an EP group: one definition for the topology, the planner and the EP engine.

    static  the built-in layout (comm.placement.Placement.static: round-robin over ranks, plus replicas in
            the redundant slots); never moves
    eplb    starts static; rebalanced from measured expert load (comm.eplb, comm.rebalance) every
            rebalance_interval_steps steps or on request

Imports nothing, so the topology and the planner can read it without torch.
"""

PLACEMENT_POLICIES = ("static", "eplb")
