"""A StageRunner on its own, in this process, over real rings: the test rig.

``Rig`` creates the replica's rings in /dev/shm (its input rings, the next
stage's rings or the clients' return rings, the clients' error rings) and,
when asked, a control block; builds a ``ReplicaSpec`` by hand as the
topology would; and runs ``StageRunner.run`` as a task of the test's event
loop. The test is the other end of every ring: it writes records encoded
with the real codec into the inputs and decodes what comes out. Nothing is
mocked; the stages are small real ``Stage``/``AsyncStage`` classes below.

Tests wait by polling a condition against a deadline (``Rig.until``), never
by sleeping a fixed time. Leaving the rig stops the runner and closes and
unlinks every segment it made.
"""

from __future__ import annotations

import asyncio
import itertools
import mmap
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import msgspec

from mpipeline import _shm
from mpipeline.codec import Codec
from mpipeline.config import PipelineConfig
from mpipeline.control import ControlBlock
from mpipeline.messages import (
    Assembled,
    Completed,
    Failed,
    Message,
    Passage,
    Priority,
    PromptRequest,
    Retrieved,
    TokenChunk,
    Usage,
    reply_info,
    request_of,
)
from mpipeline.ring import HEADER_SIZE, Ring
from mpipeline.runner import StageRunner
from mpipeline.stages.base import AsyncStage, BaseStage, Stage, StageContext
from mpipeline.topology import ReplicaSpec, ring_name

T = TypeVar("T")

# Every message a ring of the pipeline can carry.
ANY_MESSAGE: Any = PromptRequest | Retrieved | Assembled | TokenChunk | Completed | Failed
CODEC: Codec[Message] = Codec(ANY_MESSAGE)
# The next stage after each stage a rig can run.
NEXT = {"rag": "assemble", "assemble": "inference", "inference": "post", "post": "stream"}
# How long a rig waits for a condition before the test fails.
WAIT_S = 3.0
POLL_S = 0.002

_runs = itertools.count()


def run_id() -> str:
    """A run id unique to this process and test (ring names hold no '-' in it)."""
    return f"t{os.getpid()}x{next(_runs)}"


def configure(cfg: PipelineConfig, stage: str, **fields: Any) -> PipelineConfig:
    """``cfg`` with the given fields of ``[stages.<stage>]`` replaced."""
    table = msgspec.structs.replace(getattr(cfg.stages, stage), **fields)
    return msgspec.structs.replace(
        cfg, stages=msgspec.structs.replace(cfg.stages, **{stage: table})
    )


def request(
    request_id: str,
    text: str = "hello",
    *,
    session: str | None = None,
    priority: Priority = Priority.NORMAL,
    deadline_ns: int = 0,
    reply_to: int = 0,
) -> PromptRequest:
    return PromptRequest(
        request_id=request_id,
        session_id=session,
        input=text,
        priority=priority,
        deadline_ns=deadline_ns,
        reply_to=reply_to,
    )


def completed(request_id: str, reply_to: int, text: str = "done") -> Completed:
    usage = Usage(prompt_tokens=1, completion_tokens=1)
    return Completed(
        request_id=request_id, session_id=None, reply_to=reply_to, text=text, usage=usage
    )


def ids(msgs: Iterable[Message]) -> list[str]:
    """The request id of every message, in order."""
    return [reply_info(msg)[0] for msg in msgs]


def failures(msgs: Iterable[Message]) -> dict[str, Failed]:
    """The ``Failed`` messages of ``msgs`` by request id."""
    return {m.request_id: m for m in msgs if isinstance(m, Failed)}


def fill(ring: Ring) -> int:
    """Write records into ``ring`` until not even an empty one fits (as its producer).

    Returns how many records it wrote.
    """
    n = 0
    for size in (ring.max_record, 4096, 512, 64, 0):
        while ring.try_put(bytes(size)):
            n += 1
    return n


def flip_data_byte(ring: Ring, offset: int) -> None:
    """Corrupt one byte of ``ring``'s data area, as a bystander mapping would."""
    with open(_shm.segment_path(ring.name), "r+b") as f, mmap.mmap(f.fileno(), 0) as mem:
        mem[HEADER_SIZE + offset] ^= 0xFF


# Stages


class Retrieve(Stage[PromptRequest, Retrieved]):
    """A sync "rag": one ``Retrieved`` per request; input "fail" raises, "big:<n>"
    makes an output with an n-character passage."""

    name = "rag"

    def __init__(self, config: Any, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.seen: list[str] = []

    def process(self, msg: PromptRequest) -> Iterable[Retrieved]:
        self.seen.append(msg.request_id)
        if msg.input == "fail":
            raise ValueError(f"cannot take {msg.request_id}")
        if msg.input.startswith("big:"):
            text = "x" * int(msg.input[4:])
            return [Retrieved(request=msg, context=[Passage(source="s", text=text, score=1.0)])]
        return [Retrieved(request=msg)]


class Deliver(Stage[Message, Message]):
    """A sync last stage ("stream"): passes every reply on to its client."""

    name = "stream"

    def process(self, msg: Message) -> Iterable[Message]:
        return [msg]


class Model(AsyncStage[Message, Message]):
    """An async "inference" whose requests the test holds and releases.

    A request runs to completion inline unless the test ``hold``s its id (it
    then waits for ``release``) or its input is "yield" (it suspends once
    more before it ends).
    ``events`` records ("start" | "end" | "cancelled", request id) in order.
    """

    name = "inference"

    def __init__(self, config: Any, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.events: list[tuple[str, str]] = []
        self.running = 0
        self.most_running = 0
        self._gates: dict[str, asyncio.Event] = {}

    def hold(self, *request_ids: str) -> None:
        for request_id in request_ids:
            self._gates[request_id] = asyncio.Event()

    def release(self, request_id: str) -> None:
        self._gates[request_id].set()

    def release_all(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def started(self) -> list[str]:
        return [rid for what, rid in self.events if what == "start"]

    def ended(self, request_id: str) -> bool:
        return ("end", request_id) in self.events

    async def handle(self, msg: Message) -> AsyncIterator[Message]:
        req = request_of(msg)
        assert req is not None
        rid = req.request_id
        self.events.append(("start", rid))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            gate = self._gates.get(rid)
            if gate is not None:
                await gate.wait()
            if req.input == "yield":
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.events.append(("cancelled", rid))
            raise
        finally:
            self.running -= 1
        self.events.append(("end", rid))
        yield completed(rid, req.reply_to, req.input)


S = TypeVar("S", bound=BaseStage[Any, Any])


class Rig(Generic[S]):
    """One runner for ``stage`` with its rings; use as ``async with Rig(...) as rig``.

    ``outputs`` rings go to the next stage's replicas (or, for the last stage,
    one return ring per client); ``clients`` error rings, one per client.
    ``fill_outputs``/``fill_errors`` fill those rings before the runner starts
    and keep them full (unread) until ``unblock``.
    """

    def __init__(
        self,
        stage_cls: Callable[[Any, StageContext], S],
        stage_name: str,
        cfg: PipelineConfig | None = None,
        *,
        inputs: int = 1,
        outputs: int = 1,
        clients: int = 1,
        control: bool = False,
        output_bytes: int = 1 << 20,
        error_bytes: int = 64 << 10,
        fill_outputs: bool = False,
        fill_errors: bool = False,
    ) -> None:
        self.cfg = cfg or PipelineConfig()
        self.run_id = run_id()
        self._made: list[Ring] = []
        self.ctl: ControlBlock | None = None
        # Rings filled with junk records (how many) that ``poll`` leaves alone.
        self._blocked: dict[str, int] = {}
        self._junk: dict[str, int] = {}
        last = stage_name == "stream"
        nxt = "client" if last else NEXT[stage_name]
        me = f"{stage_name}0"
        try:
            self.inputs = [self._ring(f"client{c}", me, 1 << 20) for c in range(inputs)]
            if last:
                self.outputs = [self._ring(me, f"client{c}", output_bytes) for c in range(clients)]
                self.errors = self.outputs
            else:
                self.outputs = [self._ring(me, f"{nxt}{r}", output_bytes) for r in range(outputs)]
                self.errors = [self._ring(me, f"client{c}err", error_bytes) for c in range(clients)]
            for ring in (
                *(self.outputs if fill_outputs else ()),
                *(self.errors if fill_errors else ()),
            ):
                self._blocked[ring.name] = fill(ring)
            if control:
                self.ctl = ControlBlock.create(f"mpl-{self.run_id}-control", 1, clients)
            self.spec = ReplicaSpec(
                stage=stage_name,
                index=0,
                replicas=1,
                cpus=(),
                slot=0,
                next_stage=nxt,
                inputs=tuple(r.name for r in self.inputs),
                outputs=tuple(r.name for r in self.outputs),
                errors=tuple(r.name for r in self.errors),
            )
            ctx = StageContext(stage=stage_name, replica=0, replicas=1, config=self.cfg)
            self.stage = stage_cls(getattr(self.cfg.stages, stage_name), ctx)
            self.runner = StageRunner(self.spec, self.cfg, self.stage, self.ctl)
        except BaseException:
            self._unlink()
            raise
        # Records read so far, by ring name: each a list of the messages it held.
        self.records: dict[str, list[list[Message]]] = {r.name: [] for r in self.outputs}
        self.records.update({r.name: [] for r in self.errors})
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _ring(self, producer: str, consumer: str, capacity: int) -> Ring:
        ring = Ring.create(capacity, ring_name(self.run_id, producer, consumer))
        self._made.append(ring)
        return ring

    async def __aenter__(self) -> Self:
        try:
            self.runner.attach()
        except BaseException:
            self.runner.close()
            self._unlink()
            raise
        self._task = asyncio.create_task(self.runner.run(self._stop))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.stop()
        finally:
            self.runner.close()
            self._unlink()

    async def stop(self) -> None:
        """Stop the runner and wait for it (it finishes what it holds, then flushes).

        A ``Model`` stage's held requests are released first: a runner waits for them.
        """
        if isinstance(self.stage, Model):
            self.stage.release_all()
        self.signal_stop()
        if self._task is not None:
            await asyncio.wait_for(self._task, WAIT_S)

    def signal_stop(self) -> None:
        """Set the runner's stop event without waiting for it (as SIGTERM does)."""
        self._stop.set()

    def _unlink(self) -> None:
        for ring in self._made:
            ring.close()
            ring.unlink()
        if self.ctl is not None:
            self.ctl.close()
            self.ctl.unlink()

    # Driving

    def send(self, *msgs: Message, ring: int = 0) -> None:
        """Write ``msgs`` as one record into input ``ring``."""
        assert self.inputs[ring].try_put(CODEC.encode_many(list(msgs)))

    def send_raw(self, *records: bytes, ring: int = 0) -> None:
        assert self.inputs[ring].put_many(records) == len(records)

    def unblock(self, ring: Ring) -> None:
        """Let ``poll`` read a filled ring again (it skips the junk first)."""
        self._junk[ring.name] = self._blocked.pop(ring.name)

    def poll(self) -> None:
        """Read every record the runner has written so far (not from filled rings)."""
        for ring in {id(r): r for r in (*self.outputs, *self.errors)}.values():
            if ring.name in self._blocked:
                continue
            for view in ring.get_many(1024):
                if self._junk.get(ring.name):
                    self._junk[ring.name] -= 1
                else:
                    self.records[ring.name].append(CODEC.decode_many(view))
                view.release()
        if self._task is not None and self._task.done():
            self._task.result()  # the runner crashed: say why

    def out(self, ring: int = 0) -> list[Message]:
        """Every message read from output ``ring``, in order."""
        return [m for record in self.records[self.outputs[ring].name] for m in record]

    def err(self, client: int = 0) -> list[Message]:
        """Every message read from the error ring of ``client``, in order."""
        return [m for record in self.records[self.errors[client].name] for m in record]

    def everything(self) -> list[Message]:
        return [m for records in self.records.values() for record in records for m in record]

    async def until(self, predicate: Callable[[], T], what: str, within_s: float = WAIT_S) -> T:
        """Poll the rings until ``predicate()`` is truthy; fail naming ``what``."""
        deadline = time.monotonic() + within_s
        while True:
            self.poll()
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {within_s:.1f}s waiting for {what}")
            await asyncio.sleep(POLL_S)

    async def answered(self, *request_ids: str) -> list[Message]:
        """Wait until every one of ``request_ids`` has an answer; return all messages."""
        want = set(request_ids)
        await self.until(lambda: want <= set(ids(self.everything())), f"answers to {sorted(want)}")
        return self.everything()
