"""The suite fails on a deprecation that a library reports for a call from our code, and only then.

Each case runs in a pytest of its own (`pytester`) with this suite's conftest, so the policy of
tests/conftest.py is exercised as a test run meets it. The library is the real transformers:
`past_key_values` is deprecated on its models' forward, and its warning is attributed to torch's
`Module.__call__`, not to the caller, which is why a `filterwarnings` entry by module cannot catch it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

LIBRARY = '''
import warnings

warnings.warn("this library's own import-time deprecation", DeprecationWarning)


def dispatch(function, *args):
    return function(*args)


def old_api():
    warnings.warn("old_api is deprecated", FutureWarning, stacklevel=2)
'''

CASES = '''
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import library


def tiny_model():
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return AutoModelForCausalLM.from_config(config).eval()


# code whose module is one of our packages, as a function under editing/ would be
OURS = {"__name__": "editing.probe"}
exec(
    "def forward(model, ids):\\n"
    "    return model(input_ids=ids, past_key_values=None)\\n"
    "def call_old_api(library):\\n"
    "    return library.dispatch(library.old_api)\\n",
    OURS,
)


def test_our_forward_with_a_deprecated_argument():
    OURS["forward"](tiny_model(), torch.tensor([[1, 2, 3]]))


def test_our_call_of_a_deprecated_library_function():
    OURS["call_old_api"](library)


def test_the_same_forward_outside_our_packages():
    tiny_model()(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=None)


def test_a_library_deprecation_with_none_of_our_code_on_the_stack():
    library.dispatch(library.old_api)
'''


def test_a_deprecation_our_code_causes_fails_the_test_and_no_other(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(library=LIBRARY, test_cases=CASES)

    result = pytester.runpytest("-p", "no:cacheprovider")

    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_our_forward_with_a_deprecated_argument _*",
            "*FutureWarning: `past_key_values` is deprecated*(called from <string>:2)",
            "*_ test_our_call_of_a_deprecated_library_function _*",
            "*FutureWarning: old_api is deprecated (called from <string>:4)",
        ]
    )
