"""The contrastive loop shared by pretraining and the backdoor factory (rvpt.pretrain)."""
import torch

from rvpt.models import load_clip
from rvpt.pretrain import train_contrastive


def _train(compile: bool):
    torch.manual_seed(0)
    loaded = load_clip("ViT-Micro-4-p8-32")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 8, 3, 32, 32), dtype=torch.uint8, generator=g)
    texts = [f"a photo of {i} red circles on stripes" for i in range(8)]
    hist = train_contrastive(loaded, lambda epoch: ({"image": x, "text": texts} for x in images),
                             epochs=1, steps_per_epoch=3, lr=1e-3, warmup_steps=1, compile=compile)
    return hist, loaded.model


def test_compiled_loop_trains_the_same_weights():
    """pretrain.compile: the compiled forward trains the model's own weights (what is saved) and
    follows the eager loop up to floating-point order."""
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in load_clip("ViT-Micro-4-p8-32").model.state_dict().items()}
    eager, m_eager = _train(False)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled, m_compiled = _train(True)
    assert counters["stats"]["unique_graphs"] >= 1, "the forward went through torch.compile"
    assert compiled.steps == eager.steps == 3 and compiled.samples == 24
    assert abs(compiled.losses[0] - eager.losses[0]) < 1e-3 * abs(eager.losses[0])
    moved = 0
    for name, w in m_compiled.state_dict().items():
        assert torch.allclose(w, m_eager.state_dict()[name], atol=1e-4), name
        moved += not torch.equal(w, init[name])
    assert moved > 10, "training moved the weights of the module that is saved"
    assert not m_compiled.training, "the loop leaves the model in eval mode"
