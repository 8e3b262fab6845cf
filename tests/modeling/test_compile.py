"""model.torch_compile=true on CPU: every decoder layer compiled in place (inductor's generated C++), the same logits
and the same loss curve as eager on the tiny NF4 model, the parameter names (and so checkpoints) unchanged.
The training runs in tests/modeling/compile_check.py, a background job of the suite (tests/background.py: its ~80 s
of g++ run beside the other tests), whose results this test, moved to the end of the suite, reads."""

import background
import torch


def test_compiled_layers_give_the_eager_logits_and_loss_curve(request):
    results = torch.load(background.finished(request.config, "test_compile.py") / "results.pt")
    eager, compiled = results["eager"], results["compiled"]
    assert compiled["layers_compiled"] == compiled["layers"] == 2 and eager["layers_compiled"] == 0
    # counters are cumulative: eager ran first and compiled nothing; then one graph reused, or one per input kind
    assert 1 <= compiled["unique_graphs"] <= 2 * compiled["layers"] and eager["unique_graphs"] == 0
    assert compiled["names"] == eager["names"]
    torch.testing.assert_close(compiled["logits"], eager["logits"], atol=1e-5, rtol=0)
    assert eager["losses"][-1] < eager["losses"][0]  # the updates move the model
    torch.testing.assert_close(compiled["losses"], eager["losses"], atol=1e-5, rtol=0)
