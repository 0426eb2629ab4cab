"""Size-aware keys and K/V-only merging (tokenmerge.attention): the definition, every processor, masks, errors.

The definition tested: when every slot's members are identical tokens, attention over the merged slots with
``log(members)`` added to their keys equals attention over the original tokens (a softmax over ``k`` equal
logits weighs ``k`` times one of them). Without the bias it does not, which shows the test can fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
    PAGCFGIdentitySelfAttnProcessor2_0,
    PAGIdentitySelfAttnProcessor2_0,
    SlicedAttnProcessor,
)

import tokenmerge
from tokenmerge import ImportanceMerge, ReToM, SiTo, ToFu, ToMe
from tokenmerge.arguments import Signature
from tokenmerge.attention import padded_head_dim, self_attention_arguments
from tokenmerge.plan import MergePlan
from tokenmerge.tools.tiny import tiny_unet

from .conftest import add_lora, run, unet_inputs
from .models.helpers import CountingProcessor

PROCESSORS = [AttnProcessor2_0, AttnProcessor, lambda: SlicedAttnProcessor(slice_size=3)]
GROUPS = [1, 3, 2, 4, 1, 2]  # members per slot


def duplicated_tokens(batch: int = 2, channels: int = 32, seed: int = 0):
    """Tokens that are copies of ``len(GROUPS)`` vectors, shuffled, and the plan whose slots are those copies."""
    gen = torch.Generator().manual_seed(seed)
    slots = len(GROUPS)
    assign = torch.tensor([slot for slot, size in enumerate(GROUPS) for _ in range(size)])
    assign = assign[torch.randperm(len(assign), generator=gen)]
    x = torch.randn(batch, slots, channels, generator=gen)[:, assign]
    kept = torch.stack([(assign == slot).nonzero()[0, 0] for slot in range(slots)])
    plan = MergePlan(kept=kept.expand(batch, -1).contiguous(), assign=assign.expand(batch, -1).contiguous(),
                     num_dst=slots)
    return x, plan


def merged_attention(attn, x, plan, config, **kwargs):
    args, kwargs, channel = self_attention_arguments(attn, Signature.of(attn), (x,), kwargs, plan, config)
    assert channel is None
    y = attn(*args, **kwargs)
    return plan.unmerge(y) if config.merge_queries else y


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(32, heads=4, dim_head=8)


@pytest.mark.parametrize("processor", PROCESSORS, ids=["sdpa", "classic", "sliced"])
@pytest.mark.parametrize("merge_queries", [True, False], ids=["merged-queries", "kv-only"])
def test_size_aware_keys_give_full_attention_on_duplicated_tokens(attn, processor, merge_queries):
    attn.set_processor(processor())
    x, plan = duplicated_tokens()
    full = attn(x)
    exact = merged_attention(attn, x, plan, ToMe(proportional_attention=True, merge_queries=merge_queries))
    torch.testing.assert_close(exact, full, atol=1e-6, rtol=1e-5)
    plain = merged_attention(attn, x, plan, ToMe(merge_queries=merge_queries))
    assert (plain - full).abs().max() > 1e-2, "one key per slot must differ from the tokens' attention"


@pytest.mark.parametrize("mask_kind", ["additive", "boolean"])
def test_a_users_mask_is_merged_with_the_keys_not_replaced(attn, mask_kind):
    x, plan = duplicated_tokens()
    gen = torch.Generator().manual_seed(1)
    if mask_kind == "additive":
        mask = torch.randn(2, 1, x.shape[1], generator=gen)  # members of a slot may differ: log-sum-exp
    else:
        mask = torch.rand(2, 1, x.shape[1], generator=gen) > 0.3
        mask[..., 0] = True
    full = attn(x, attention_mask=mask if mask_kind == "additive" else
                torch.zeros(mask.shape).masked_fill(~mask, float("-inf")))
    for merge_queries in (True, False):
        config = ToMe(proportional_attention=True, merge_queries=merge_queries)
        got = merged_attention(attn, x, plan, config, attention_mask=mask)
        torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-5)


def test_without_size_aware_keys_a_mask_gives_each_slot_its_members_mean_weight(attn):
    x, plan = duplicated_tokens()
    mask = torch.randn(2, 1, x.shape[1])
    slot_mask = plan.merge_logits(mask[:, 0]) - plan.sizes().log()
    expected = plan.unmerge(attn(plan.merge(x), attention_mask=slot_mask[:, None]))
    got = merged_attention(attn, x, plan, ToMe(), attention_mask=mask)
    torch.testing.assert_close(got, expected)
    uniform = merged_attention(attn, x, plan, ToMe(), attention_mask=torch.zeros(2, 1, x.shape[1]))
    torch.testing.assert_close(uniform, merged_attention(attn, x, plan, ToMe()), atol=1e-6, rtol=1e-5)


def test_slot_sizes_of_merging_and_pruning_plans():
    assign = torch.tensor([[0, 0, 1, 2, 1, 1]])
    kept = torch.tensor([[0, 2, 3]])
    merging = MergePlan(kept=kept, assign=assign, num_dst=2)
    pruning = MergePlan(kept=kept, assign=assign, num_dst=2, prune=True)
    assert merging.sizes().tolist() == [[2.0, 3.0, 1.0]]
    assert pruning.sizes(count_pruned=True).tolist() == [[2.0, 3.0, 1.0]]
    assert pruning.sizes(count_pruned=False).tolist() == [[1.0, 1.0, 1.0]]
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, float("-inf"), 0.5]])
    assert pruning.merge_logits(logits, count_pruned=False).tolist() == [[0.0, 2.0, 3.0]]
    expected = [torch.tensor([0.0, 1.0]).logsumexp(0), torch.tensor([2.0, float("-inf"), 0.5]).logsumexp(0), 3.0]
    torch.testing.assert_close(merging.merge_logits(logits), torch.tensor([expected]))


def test_size_bias_without_counting_pruned_tokens_raises_where_every_plan_prunes(sd1_unet):
    # Measured (docs/quality.md): SiTo with count_pruned=False gave its plain outputs bit for bit: every kept key
    # counts only itself, log 1 = 0. Such a config would silently do nothing, so it raises.
    for config in (dict(cls=SiTo), dict(cls=ToFu, prune_blocks="all"), dict(cls=ImportanceMerge, prune_steps=1.0)):
        cls = config.pop("cls")
        with pytest.raises(ValueError, match="count_pruned=False would do nothing"):
            cls(ratio=0.5, proportional_attention=True, count_pruned=False, **config)
    ToFu(ratio=0.5, proportional_attention=True, count_pruned=False)  # its up blocks merge: the field matters
    args, kwargs = unet_inputs(sd1_unet, 2)
    with tokenmerge.patched(sd1_unet, SiTo(ratio=0.5, seed=0)):
        plain = run(sd1_unet, args, kwargs)
    with tokenmerge.patched(sd1_unet, SiTo(ratio=0.5, seed=0, proportional_attention=True)):
        counted = run(sd1_unet, args, kwargs)
    assert not torch.allclose(counted, plain, atol=1e-5)


EVERY_METHOD = [ToMe(ratio=0.5), ImportanceMerge(ratio=0.7), ReToM(ratio=0.5), SiTo(ratio=0.5), ToFu(ratio=0.5)]
MODES = [dict(proportional_attention=True), dict(merge_queries=False),
         dict(proportional_attention=True, merge_queries=False),
         dict(proportional_attention=True, bias_via="channel")]


@pytest.mark.parametrize("mode", MODES, ids=["size-aware", "kv-only", "kv-only-size-aware", "channel"])
@pytest.mark.parametrize("config", EVERY_METHOD, ids=lambda c: type(c).__name__)
def test_every_method_in_every_mode_merges_and_remove_restores_bit_identical(sd1_unet, config, mode):
    args, kwargs = unet_inputs(sd1_unet, 2)
    timesteps = (950, 500)  # ImportanceMerge: a pruning step, then a merging step
    unpatched = [run(sd1_unet, args, kwargs, timestep=t) for t in timesteps]
    with tokenmerge.patched(sd1_unet, dataclasses.replace(config, ratio=0.0, **mode)):
        for t, expected in zip(timesteps, unpatched):
            assert torch.equal(run(sd1_unet, args, kwargs, timestep=t), expected)
    with tokenmerge.patched(sd1_unet, dataclasses.replace(config, seed=0, **mode)):
        merged = [run(sd1_unet, args, kwargs, timestep=t) for t in timesteps]
    with tokenmerge.patched(sd1_unet, dataclasses.replace(config, seed=0, proportional_attention=False)):
        plain = [run(sd1_unet, args, kwargs, timestep=t) for t in timesteps]
    assert all(torch.isfinite(m).all() for m in merged)
    assert not torch.allclose(merged[1], plain[1], atol=1e-6), "the mode must change what the method computes"
    assert not torch.allclose(merged[1], unpatched[1], atol=1e-4), "and still merge"
    assert all(torch.equal(run(sd1_unet, args, kwargs, timestep=t), e) for t, e in zip(timesteps, unpatched))
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in sd1_unet.modules())


@pytest.mark.parametrize("merge_queries,expected", [(True, (128, 128)), (False, (256, 128))])
def test_kv_only_keeps_every_query_and_merges_keys_and_values(sd1_unet, merge_queries, expected):
    args, kwargs = unet_inputs(sd1_unet, 2)
    counting = CountingProcessor()
    sd1_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(counting)
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, seed=0, merge_queries=merge_queries)):
        run(sd1_unet, args, kwargs)
    assert counting.calls == [expected]


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor], ids=["sdpa-scale", "attn-scale"])
@pytest.mark.parametrize("merge_queries", [True, False], ids=["merged-queries", "kv-only"])
def test_the_bias_channel_equals_the_bias_mask(sd1_unet, processor, merge_queries):
    sd1_unet.set_attn_processor(processor())
    args, kwargs = unet_inputs(sd1_unet, 2)
    outputs = {}
    for via in ("mask", "channel"):
        with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, seed=0, proportional_attention=True, bias_via=via,
                                               merge_queries=merge_queries)):
            outputs[via] = run(sd1_unet, args, kwargs)
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, seed=0, merge_queries=merge_queries)):
        plain = run(sd1_unet, args, kwargs)
    torch.testing.assert_close(outputs["channel"], outputs["mask"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outputs["channel"], plain, atol=1e-4)


def test_the_bias_channel_passes_no_mask_and_pads_the_head_dim_to_a_multiple_of_8(sd1_unet):
    seen = []

    class Spy(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            seen.append(attention_mask)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    attn = sd1_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn.set_processor(Spy())
    keys = []
    handle = torch.nn.functional.scaled_dot_product_attention
    try:
        def sdpa(q, k, v, *a, **kw):
            keys.append(k.shape[-1])
            return handle(q, k, v, *a, **kw)
        torch.nn.functional.scaled_dot_product_attention = sdpa
        args, kwargs = unet_inputs(sd1_unet, 2)
        with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, seed=0, proportional_attention=True, bias_via="channel")):
            run(sd1_unet, args, kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = handle
    head_dim = attn.to_out[0].in_features // attn.heads
    assert seen == [None]
    assert keys[0] == padded_head_dim(head_dim) and keys[0] % 8 == 0 and keys[0] > head_dim


@pytest.mark.parametrize("processor,guided", [(PAGIdentitySelfAttnProcessor2_0, 1), (PAGCFGIdentitySelfAttnProcessor2_0, 2)])
def test_pag_processors_give_their_guided_rows_the_size_aware_attention_of_sdpa(sd1_unet, processor, guided):
    """PAG's processors attend only the guided part of the batch (``[cond; perturbed]``, ``[uncond; cond;
    perturbed]``) and take the perturbed part through identity attention: the size bias goes to those rows, and they
    come out as the standard processor computes them. K/V-only cannot pass: the processor takes keys from its input."""
    parts = guided + 1
    args, kwargs = unet_inputs(sd1_unet, parts)
    config = ToMe(ratio=0.5, use_rand=False, proportional_attention=True)
    with tokenmerge.patched(sd1_unet, config):
        standard = run(sd1_unet, args, kwargs)
    blocks = [m for m in sd1_unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        block.attn1.set_processor(processor())
    try:
        with tokenmerge.patched(sd1_unet, config):
            perturbed = run(sd1_unet, args, kwargs)
        unmerged_perturbed = run(sd1_unet, args, kwargs)
        with tokenmerge.patched(sd1_unet, ToMe(merge_queries=False)), pytest.raises(ValueError, match=processor.__name__):
            run(sd1_unet, args, kwargs)
    finally:
        sd1_unet.set_attn_processor(AttnProcessor2_0())
    torch.testing.assert_close(perturbed[:guided], standard[:guided], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(perturbed[guided:], standard[guided:], atol=1e-3), "the perturbed row is perturbed"
    assert not torch.allclose(perturbed[guided:], unmerged_perturbed[guided:], atol=1e-5), "and merged"


def test_processors_that_cannot_take_the_bias_raise_naming_themselves(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    attn = sd1_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1

    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)

    attn.set_processor(Custom())
    with tokenmerge.patched(sd1_unet, ToMe(proportional_attention=True)), pytest.raises(ValueError, match="Custom"):
        run(sd1_unet, args, kwargs)

    sd1_unet.set_attn_processor(AttnProcessor2_0())
    sd1_unet.fuse_qkv_projections()
    assert isinstance(attn.processor, FusedAttnProcessor2_0)
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, seed=0, proportional_attention=True)):
        fused = run(sd1_unet, args, kwargs)
    config = ToMe(proportional_attention=True, bias_via="channel")
    with tokenmerge.patched(sd1_unet, config), pytest.raises(ValueError, match="FusedAttnProcessor2_0.*bias_via='mask'"):
        run(sd1_unet, args, kwargs)
    sd1_unet.unfuse_qkv_projections()
    sd1_unet.set_attn_processor(AttnProcessor2_0())
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, seed=0, proportional_attention=True)):
        torch.testing.assert_close(run(sd1_unet, args, kwargs), fused, atol=1e-5, rtol=1e-4)


def test_peft_lora_with_size_aware_keys(sd1_unet):
    add_lora(sd1_unet)
    args, kwargs = unet_inputs(sd1_unet, 2)
    lora = run(sd1_unet, args, kwargs)
    outputs = []
    for via in ("mask", "channel"):
        with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, seed=0, proportional_attention=True, bias_via=via)):
            outputs.append(run(sd1_unet, args, kwargs))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outputs[0], lora, atol=1e-4)
    assert torch.equal(run(sd1_unet, args, kwargs), lora)


@pytest.mark.parametrize("fields,message", [
    (dict(bias_via="channel", proportional_attention=False), "bias_via='channel'.*proportional_attention"),
    (dict(count_pruned=False, proportional_attention=False), "count_pruned=False.*proportional_attention"),
    (dict(proportional_attention=True, bias_via="flash"), "bias_via must be one of"),
    (dict(proportional_attention=1), "proportional_attention must be True or False"),
    (dict(merge_queries=False, merge_attn=False, merge_mlp=True), "merge_queries=False.*merge_attn=False"),
])
def test_bad_attention_fields_raise_naming_the_field(fields, message):
    for method in (ToMe, ImportanceMerge, ReToM, SiTo, ToFu):
        with pytest.raises(ValueError, match=message):
            method(**fields)


def test_a_mask_with_a_query_dimension_raises_naming_the_shapes_merging_supports(attn):
    x, plan = duplicated_tokens()
    mask = torch.zeros(2, x.shape[1], x.shape[1])
    with pytest.raises(ValueError, match=r"one bias per key \(2, 13\)"):
        self_attention_arguments(attn, Signature.of(attn), (x,), {"attention_mask": mask}, plan, ToMe())


def ip_adapter_unet():
    """A tiny SD U-Net whose cross-attentions run diffusers' IP-Adapter processor (random image-prompt weights)."""
    unet = tiny_unet("sd1")
    processors = {}
    for name, processor in unet.attn_processors.items():
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        processors[name] = (IPAdapterAttnProcessor2_0(attn.to_q.in_features, 32, num_tokens=(4,), scale=1.0)
                            if name.endswith("attn2.processor") else processor)
    unet.set_attn_processor(processors)
    return unet


def ip_adapter_call(unet, masks):
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 32, generator=gen)
    image_prompt = torch.randn(2, 1, 4, 32, generator=gen)
    options = {} if masks is None else {"ip_adapter_masks": masks}
    with torch.no_grad():
        return unet(x, torch.tensor(500), encoder_hidden_states=(text, [image_prompt]),
                    cross_attention_kwargs=options).sample


def test_ip_adapter_masks_with_merged_cross_attention_queries_raise_instead_of_misaligning():
    """diffusers resizes an IP-Adapter mask to the query count; merged queries would get a mask that does not line
    up with them, silently. merge_crossattn=True raises on a masked call; the default merges self-attention only
    and takes the masks as they are."""
    unet = ip_adapter_unet()
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., :64] = 1  # the left half of the image
    masks = [mask]
    with tokenmerge.patched(unet, ToMe(ratio=0.5, merge_crossattn=True, min_tokens=0, seed=0)):
        ip_adapter_call(unet, None)  # no masks: merged cross-attention queries are fine
        with pytest.raises(ValueError, match="IP-Adapter masks.*merge_crossattn=False"):
            ip_adapter_call(unet, masks)
    reference = ip_adapter_call(unet, masks)
    with tokenmerge.patched(unet, ToMe(ratio=0.5, min_tokens=0, seed=0)):
        merged = ip_adapter_call(unet, masks)
    assert merged.shape == reference.shape and not torch.equal(merged, reference)
    assert torch.equal(ip_adapter_call(unet, masks), reference)
