"""`pretrain_tiny` with a tokenizer that reserves the tool-use tokens (data.tool_tokens): the
base of the tool-calling chain (`make rl-tools`: sft_calc, then grpo_calc). Everything else
is `pretrain_tiny`'s: about 7 minutes on a 2-core CPU."""

import dataclasses

from experiments import pretrain_tiny
from lm.config import Config


def config() -> Config:
    base = pretrain_tiny.config()
    return dataclasses.replace(base, name="pretrain_tools", data=dataclasses.replace(base.data, tool_tokens=True))
