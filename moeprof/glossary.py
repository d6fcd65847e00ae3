"""Terms used across moeprof, defined once.

token-route
    One (token, MoE layer, chosen expert) triple. A token in a top-k layer makes k token-routes.
n(l, e)
    Number of token-routes to expert ``e`` in layer ``l`` over some token set.
layer
    The transformer layer index as the model numbers it (``model.layers[i]``), not the ordinal among
    MoE layers. ``manifest.model.moe_layers`` lists which layers are MoE layers.
logical expert
    An expert as the model defines it: ids ``0 .. E-1`` in each MoE layer.
physical expert / slot
    A copy of a logical expert's weights on some GPU. With redundancy there are more physical
    experts than logical ones; ``physical_to_logical_map[p]`` names the logical expert in slot ``p``.
replica
    One of the physical copies of a logical expert; ``logical_replica_count[e]`` counts them.
step
    Forward pass of one request: 0 is the prefill (all prompt tokens at once), i >= 1 the i-th decode
    step (one new token each).
phase
    ``prefill`` for step 0, ``decode`` for steps >= 1.
batch / forward pass
    One call of the model's forward, carrying tokens of one or more requests; ``batch_id`` names it.
domain
    A label of the request's kind of text (code, math, chat, general, ...), attached by the workload.
imbalance (straggler factor)
    ``max_e n / mean_e n`` over the experts of a layer, or over GPUs given a placement. 1.0 is perfect
    balance; vLLM and SGLang log the inverse ``mean / max`` as "balancedness".
"""
