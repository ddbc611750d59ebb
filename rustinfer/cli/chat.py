"""``rustinfer chat``: a terminal chat, like ``ollama run``, on the engine the server uses.

Input is read with ``input()`` on the main thread between answers (with readline editing when the
module exists), so Ctrl-C at the prompt is an ordinary ``KeyboardInterrupt`` that clears the line.
Each answer runs on one long-lived event loop (``asyncio.Runner``) as a task; while it streams,
SIGINT is routed to the loop and cancels that task, and the cancellation reaches
``AsyncEngine.generate``, whose cleanup aborts the request so its KV blocks are freed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from rustinfer.cli.common import add_model_options, apply_threads
from rustinfer.engine.async_engine import AsyncEngine
from rustinfer.engine.core import EngineConfig
from rustinfer.engine.model_runner import DEFAULT_BLOCK_SIZE, kv_bytes_per_block
from rustinfer.engine.outputs import RequestOutput, RequestTimings
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import RustinferError
from rustinfer.runtime.loading import LoadedModel, load_model_from

logger = logging.getLogger(__name__)

Message = dict[str, str]

PROMPT = ">>> "
# One conversation never needs more KV than the model's context; and the rest of the machine
# (another process on the GPU, the OS on a CPU box) keeps at least half of what was free.
_KV_MEMORY_FRACTION = 0.5

HELP = """\
/help              this list
/reset             forget the conversation (the system prompt stays)
/system TEXT       set the system prompt and start a new conversation
/system            show the system prompt
/exit              quit (also /bye, Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while an answer streams stops it; the partial answer is dropped from the history
(the question stays), as in ollama."""

_COMMANDS = {
    "/help": "help",
    "/?": "help",
    "/reset": "reset",
    "/clear": "reset",
    "/system": "system",
    "/exit": "exit",
    "/bye": "exit",
    "/quit": "exit",
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="A multi-turn chat that streams each answer; /help inside lists the commands.",
    )
    add_model_options(p)
    p.add_argument(
        "--system", default=None, metavar="TEXT", help="system prompt (default: the template's)"
    )
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer (default 512)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.set_defaults(func=run)


# -- pure helpers (unit-tested without a model) --------------------------------------------------


def parse_command(line: str) -> tuple[str, str] | None:
    """``(action, argument)`` for a known ``/command``, ``("unknown", name)`` for another one, and
    None for a line that is a message."""
    if not line.startswith("/"):
        return None
    name, _, rest = line.partition(" ")
    action = _COMMANDS.get(name.lower())
    return ("unknown", name) if action is None else (action, rest.strip())


def build_messages(system: str | None, history: list[Message]) -> list[Message]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + history


def fit_context(
    render: Callable[[list[Message]], list[int]],
    system: str | None,
    history: list[Message],
    max_tokens: int,
    limit: int,
) -> tuple[list[int], int, int]:
    """Render the conversation so that prompt + answer fit in ``limit`` tokens.

    Like ollama, the oldest messages go first (the system prompt and the newest message never do);
    ``history`` is trimmed in place, so a long chat does not re-render what it already dropped.
    Only when the newest message alone leaves less than ``max_tokens`` is the answer shortened.
    Returns ``(prompt ids, messages dropped, max_tokens for this answer)``.
    """
    dropped = 0
    ids = render(build_messages(system, history))
    while len(ids) + max_tokens > limit and len(history) > 1:
        del history[0]
        dropped += 1
        # A conversation starts with the user: an answer whose question is gone goes too.
        while len(history) > 1 and history[0]["role"] == "assistant":
            del history[0]
            dropped += 1
        ids = render(build_messages(system, history))
    room = limit - len(ids)
    if room < 1:
        raise ValueError(
            f"the message needs {len(ids)} prompt tokens: no room left in the context of {limit} "
            "tokens; send a shorter one"
        )
    return ids, dropped, min(max_tokens, room)


@dataclass
class Reply:
    """One streamed answer, as far as it got."""

    prompt_tokens: int
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    cached_tokens: int = 0
    timings: RequestTimings = field(default_factory=RequestTimings)
    finish_reason: str | None = None
    stopped: bool = False  # Ctrl-C ended it

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text_delta)
        self.num_tokens += len(out.new_token_ids)
        self.cached_tokens = out.cached_tokens
        self.timings = out.timings
        if out.finished:
            self.finish_reason = out.finish_reason


def format_stats(reply: Reply) -> str:
    """One line: answer tokens, decode rate, TTFT, and the prompt size (which grows each turn,
    since the whole history is sent; cached: the part the prefix cache did not recompute)."""
    t = reply.timings
    decode_s = t.decode_s or 0.0
    # The first token comes from the prefill, so the decode rate counts the ones after it.
    rate = (reply.num_tokens - 1) / decode_s if reply.num_tokens > 1 and decode_s > 0 else 0.0
    ttft = f"{t.ttft_s * 1000:.0f} ms" if t.ttft_s is not None else "-"
    line = (
        f"{reply.num_tokens} tokens, {rate:.1f} tok/s, TTFT {ttft}, "
        f"prompt {reply.prompt_tokens} tokens ({reply.cached_tokens} cached)"
    )
    return f"stopped: {line}" if reply.stopped else line


def chat_engine_config(loaded: LoadedModel) -> EngineConfig:
    """One sequence at a time, a KV cache of one full context (or what memory allows), and the
    prefix cache on: each turn resends the history, whose KV is then reused, not recomputed."""
    block = DEFAULT_BLOCK_SIZE
    per_block = kv_bytes_per_block(loaded.model, block)
    budget = -(-loaded.config.max_position_embeddings // block) * per_block
    free, _total = loaded.device.memory_info()
    if free > 0:  # 0: the device could not tell
        budget = min(budget, int(free * _KV_MEMORY_FRACTION))
    return EngineConfig(
        block_size=block,
        max_num_seqs=1,
        kv_cache_bytes=max(budget, per_block),
        enable_prefix_caching=True,
    )


# -- the session --------------------------------------------------------------------------------


class _Style:
    """Dim text for the notes on a terminal; plain text in a file or with NO_COLOR set."""

    def __init__(self, stream: TextIO) -> None:
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.enabled = tty and not os.environ.get("NO_COLOR")

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.enabled else text


class ChatSession:
    def __init__(
        self,
        engine: AsyncEngine,
        loaded: LoadedModel,
        params: SamplingParams,
        system: str | None,
        out: TextIO,
        err: TextIO,
    ) -> None:
        if loaded.tokenizer is None:
            raise ValueError("this model has no tokenizer (a dummy config?), so it cannot chat")
        self.engine = engine
        self.tokenizer = loaded.tokenizer
        self.params = params
        self.system = system
        self.history: list[Message] = []
        self.out, self.err = out, err
        self.style = _Style(err)
        self.limit = engine.core.context_limit  # a constant, safe to read from this thread
        self._requests = 0

    # -- the loop --

    def repl(self, runner: asyncio.Runner) -> None:
        interrupts = 0  # Ctrl-C presses in a row at the prompt
        while True:
            try:
                # CPython's readline notices Ctrl-C only while it waits for a key: one pressed in
                # the instant it handles another key stays pending until the next key (CPython's
                # own REPL behaves the same). Stopping an answer does not depend on this.
                line = input(PROMPT)
            except EOFError:  # Ctrl-D
                self.out.write("\n")
                return
            except KeyboardInterrupt:  # like a shell: drop the line, a second one in a row quits
                self.out.write("\n")
                interrupts += 1
                if interrupts >= 2:
                    return
                self.note("(Ctrl-C again, Ctrl-D or /exit to quit)")
                continue
            interrupts = 0
            text = line.strip()
            if not text:
                continue
            command = parse_command(text)
            try:
                if command is None:
                    self.turn(runner, text)
                elif not self.command(*command):
                    return
            except KeyboardInterrupt:
                # Ctrl-C in the instants just before or after an answer streams (outside the
                # handler that stops it) must not quit the chat either.
                self.out.write("\n")

    def command(self, action: str, arg: str) -> bool:
        """Run one ``/command``; False means quit."""
        if action == "exit":
            return False
        if action == "help":
            self.say(HELP)
        elif action == "reset":
            self.history.clear()
            self.say("(conversation cleared)")
        elif action == "system" and arg:
            self.system = arg
            self.history.clear()
            self.say("(system prompt set; conversation cleared)")
        elif action == "system":
            self.say(self.system if self.system is not None else "(the chat template's default)")
        else:
            self.say(f"unknown command {arg}: /help lists the commands")
        return True

    def turn(self, runner: asyncio.Runner, text: str) -> None:
        """Send one user message with the history and stream the answer."""
        self.history.append({"role": "user", "content": text})
        wanted = self.params.max_tokens  # None: as long as the context allows
        try:
            ids, dropped, max_tokens = fit_context(
                self._render, self.system, self.history, wanted or 1, self.limit
            )
        except (RustinferError, ValueError) as exc:  # the template refused it, or it is too long
            self.history.pop()
            self.error(exc)
            return
        if dropped:
            self.note(f"(context full: forgot the {dropped} oldest message(s))")
        params = (
            self.params
            if wanted is None
            else dataclasses.replace(self.params, max_tokens=max_tokens)
        )
        try:
            reply = runner.run(self._answer(ids, params))
        except KeyboardInterrupt:
            # Ctrl-C in the instant before our handler was installed: asyncio.Runner cancelled the
            # turn (the request, if it started, was aborted on the way out). Same as a stop.
            reply = Reply(len(ids), stopped=True)
        except (RustinferError, ValueError) as exc:
            self.out.write("\n")
            self.history.pop()
            self.error(exc)
            return
        self.out.write("\n")
        self.out.flush()  # the answer before its stats, in that order on a terminal
        if not reply.stopped:
            self.history.append({"role": "assistant", "content": "".join(reply.text)})
        self.note(format_stats(reply))
        self.say("")  # a blank line between turns, as ollama leaves
        logger.debug(
            "turn done: %s, history of %d messages", reply.finish_reason, len(self.history)
        )

    def _render(self, messages: list[Message]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    async def _answer(self, ids: list[int], params: SamplingParams) -> Reply:
        loop = asyncio.get_running_loop()
        reply = Reply(len(ids))
        task = asyncio.create_task(self._stream(ids, params, reply))
        # Until the answer ends, Ctrl-C cancels the stream task from a loop callback: never a
        # KeyboardInterrupt raised mid-statement, so the abort in generate()'s cleanup always runs.
        # Both lines run before the loop can, so no signal is handled between them.
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # This coroutine itself was cancelled: by asyncio.Runner's own Ctrl-C handling in
                # the instant before ours was installed, or by the loop closing. Not ours to eat.
                raise
            reply.stopped = True
        finally:
            loop.remove_signal_handler(signal.SIGINT)  # restores Python's KeyboardInterrupt
        return reply

    async def _stream(self, ids: list[int], params: SamplingParams, reply: Reply) -> None:
        self._requests += 1
        request_id = f"chat-{self._requests}"
        # aclosing: if writing fails, the request is aborted now, not when the generator is
        # collected.
        async with contextlib.aclosing(self.engine.generate(ids, params, request_id)) as outputs:
            async for out in outputs:
                reply.add(out)
                if out.text_delta:
                    self.out.write(out.text_delta)
                    self.out.flush()  # each delta shows as it arrives

    # -- output --

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        self.err.write(self.style.dim(text) + "\n")
        self.err.flush()

    def error(self, exc: BaseException) -> None:
        self.err.write(f"error: {exc}\n")
        self.err.flush()


def _enable_line_editing() -> None:
    """Importing readline gives ``input()`` line editing and history on a terminal."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # absent on some platforms: plain input() then
            import readline  # noqa: F401


def run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    # Built first, so a bad --temperature fails before a load of several seconds.
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    err = sys.stderr
    style = _Style(err)
    name = args.model or "the embedded SmolLM2-135M-Instruct"
    err.write(style.dim(f"loading {name} ...") + "\n")
    err.flush()
    loaded = load_model_from(args)
    engine = AsyncEngine.from_loaded(loaded, chat_engine_config(loaded))
    session = ChatSession(engine, loaded, params, args.system, sys.stdout, err)
    dtype = str(loaded.dtype).removeprefix("torch.")
    err.write(
        style.dim(
            f"{loaded.name} on {loaded.device} ({dtype}), loaded in {loaded.load_seconds:.1f} s, "
            f"context {session.limit} tokens; /help for commands"
        )
        + "\n"
    )
    err.flush()
    _enable_line_editing()
    # One loop for the whole session: the engine thread hands outputs to the loop a request was
    # made on, and between answers the loop is idle while input() waits on the main thread.
    with asyncio.Runner() as runner:
        try:
            session.repl(runner)
        finally:
            runner.run(engine.shutdown())
    return 0
