"""DEQ transformer: causal, a fixed point, exact gradients, compiles; the stdlib corpus and the token loss."""
import math
import time

import pytest
import torch
from torch.nn import functional as F

from iterlayers.data import CHAR_VOCAB, decode_chars, encode_chars, load_dataset, stdlib_files
from iterlayers.models import build_model
from iterlayers.training import sample_loss

f64 = torch.float64


def _model(**kw):
    torch.manual_seed(0)
    opts = dict(width=8, heads=2, init_scale=1.0, atol=1e-12, rtol=0, max_iter=300)
    opts.update(kw)
    return build_model("deq_transformer", 6, 11, **opts).double()


def test_output_is_the_fixed_point_and_causal():
    model = _model()
    x = torch.randint(0, 11, (4, 6))
    logits = model(x)
    assert model.deq.stats["forward"].status == "converged"
    with torch.no_grad():
        u = model.inject(x)
        z = model.deq(u)
        assert float((model.cell(z, u) - z).flatten(1).norm(dim=1).max()) < 1e-11  # true residual
    y = x.clone()
    y[:, 3] = (y[:, 3] + 1) % 11  # change position 3: positions 0..2 must not move
    changed = model(y)
    torch.testing.assert_close(changed[:, :3], logits[:, :3], rtol=0, atol=1e-9)
    assert float((changed[:, 3:] - logits[:, 3:]).detach().abs().max()) > 1e-4


def test_implicit_gradient_passes_gradcheck():
    model = _model(backward_atol=1e-13, backward_max_iter=300)
    u = torch.randn(1, 3, 8, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: model.deq(inp), (u,), eps=1e-6, atol=1e-6)


def test_compiled_cell_with_inductor_matches_eager():
    torch.manual_seed(0)
    model = build_model("deq_transformer", 8, 20, width=8, atol=1e-6, rtol=0, max_iter=60, backward_atol=1e-6)
    x = torch.randint(0, 20, (3, 8))
    ref = model(x)
    ref.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.deq.cell.compile(backend="inductor", dynamic=False)
    start = time.process_time()
    out = model(x)
    out.square().sum().backward()
    assert time.process_time() - start < 60  # measured about 12 s of CPU on one core, compilation included
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-4)


def test_stdlib_corpus_is_split_by_file_and_shifted_by_one():
    data = load_dataset("stdlib_chars")
    assert data.num_classes == len(CHAR_VOCAB) == 98
    assert data.x_train.dtype == torch.int64 and data.x_train.shape[1] == 64
    torch.testing.assert_close(data.x_train[:, 1:], data.y_train[:, :-1])
    files = stdlib_files()
    held_out = files[0].read_text(encoding="utf-8", errors="replace")
    assert decode_chars(data.x_test[0, :40]) == held_out[:40]
    train_text = "".join(decode_chars(row) for row in data.x_train[:20])
    assert held_out[:200] not in train_text and files[1].read_text()[:64] == decode_chars(data.x_train[0])
    assert encode_chars("a\u00e9\n").tolist() == [CHAR_VOCAB.index("a"), 0, 1]


def test_sequence_loss_is_the_mean_token_cross_entropy():
    torch.manual_seed(3)
    logits, y = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    loss, correct = sample_loss(logits, y)
    by_hand = torch.stack([torch.stack([F.cross_entropy(logits[b, t], y[b, t]) for t in range(5)]).mean()
                           for b in range(2)])
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(correct, (logits.argmax(-1) == y).double().mean(1))
    # a uniform model has perplexity exactly the vocabulary size
    flat, _ = sample_loss(torch.zeros(3, 4, 98), torch.randint(0, 98, (3, 4)))
    assert math.exp(float(flat.mean())) == pytest.approx(98, rel=1e-6)


def test_bad_tokens_are_refused():
    model = build_model("deq_transformer", 6, 11, width=8)
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="outside"):
        model(torch.full((2, 6), 11))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(2, 7, dtype=torch.long))
