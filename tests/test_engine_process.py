"""The process client's pipe messages: each a frozen dataclass that survives its tagged JSON encoding."""
from __future__ import annotations

import json

import pytest

from mixtral_export.runtimes.engine_process import (Cancel, Close, Ended, Failed, Ready, StepReport, Submit, decode,
                                                    encode)
from mixtral_export.runtimes.requests import GenerationConfig
from mixtral_export.runtimes.sampling import SamplingParams

CONFIG = GenerationConfig(max_new_tokens=7, sampling=SamplingParams(temperature=0.5, top_k=3, seed=11),
                          eos_token_ids=(2, 32000), stop_strings=("\n\n", "END"))


@pytest.mark.parametrize("message", [
    Submit(4, [1, 5, 9], CONFIG, None), Submit(5, [1], GenerationConfig(max_new_tokens=1), 2.5), Cancel(4),
    Close(1.5), Ready(1234), Failed("out/x: no manifest.json"),
    StepReport(2, 1, [(4, 17, "ab"), (5, 3, "")], [Ended(4, [17, 2], "ab", "eos"), Ended(6, [], None, "cancelled",
                                                                                        "RuntimeError: lost")])])
def test_every_message_round_trips_as_tagged_json(message):
    data = encode(message)
    assert json.loads(data)["type"] == type(message).__name__
    assert decode(data) == message


def test_a_submitted_config_arrives_whole():
    arrived = decode(encode(Submit(0, [1], CONFIG, None))).config
    assert arrived == CONFIG and arrived.sampling.seed == 11 and arrived.stop_strings == ("\n\n", "END")
