"""Any agent code, trained as it is: an agent written against the OpenAI client (rlflow/envs/agent.py).

    pip install openai
    rlflow -cn agent_calc                    # from the repository root: the recipe names this function
    python -m examples.openai_agent          # the same, no W&B

The agent solves the calc task (``37*48=`` -> ``1776``) with a calculator it runs itself: it asks the
model, and while the model answers with a call, ``calc(37*48)``, it runs it and sends the result back
as a tool message. It knows nothing of rlflow: rlflow serves the chat endpoint at ``base_url``,
generates every completion with the policy it trains, and keeps the exact tokens of every call. The
reward is the agent's return value. A call past ``env.max_turns`` is refused (the client raises), and
the episode scores 0.
"""

from __future__ import annotations

import re

from openai import AsyncOpenAI

from rlflow.envs.tools import calc

CALL = re.compile(r"^\s*calc\((.*)\)\s*$", re.DOTALL)


async def run_agent(record: dict, base_url: str) -> tuple[float, dict]:
    async with AsyncOpenAI(base_url=base_url, api_key="unused") as client:
        messages, calls = [{"role": "user", "content": record["prompt"]}], 0
        while True:
            reply = await client.chat.completions.create(model="policy", messages=messages)
            text = reply.choices[0].message.content
            messages.append({"role": "assistant", "content": text})
            call = CALL.match(text)
            if call is None:  # no call: this is the answer
                return float(text.strip() == record["answer"]), {"tool_call": calls}
            try:
                result = calc(call.group(1))
            except ValueError as e:
                result = f"error: {e}"
            messages.append({"role": "tool", "content": f" -> {result}\n"})
            calls += 1


if __name__ == "__main__":
    import sys

    from rlflow.flow.cli import main

    sys.exit(main(["-cn", "agent_calc", "tracking.wandb=false", *sys.argv[1:]]))
