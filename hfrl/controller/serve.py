"""Every rank but 0: run rank 0's commands, in the order it issued them, until shutdown.

Commands (CMD channel, from rank 0):

    create    build a role's process groups (every rank) and its worker (the pool's ranks)
    call      receive the relayed piece (forwarding it down its tree) and the chained pieces,
              run the method, reply with a status (and the output, for eager calls)
    send      send rows of a stored output to consumer ranks (chained futures)
    fetch     reply with a stored output
    shutdown / abort

Every failure is turned into an error reply naming the method: an exception in the method, an
argument that cannot be assembled, an output that cannot be encoded. The rank stays up for the
next command. A failed call still reads every piece sent to it, so the next call finds its
channels clean. Rank 0 plays both ends of a chained Future the same way, inline: the code for
them is `Runtime`'s.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

from hfrl.controller.errors import NotRunError
from hfrl.controller.runtime import Runtime, output_status
from hfrl.controller.transport import CMD, RELAY, REPLY
from hfrl.controller.watchdog import Watchdog

logger = logging.getLogger(__name__)


class Server(Runtime):
    """A worker rank's command loop."""

    def __init__(self, ctx, config=None, watchdog: Watchdog | None = None):
        super().__init__(ctx, config)
        self.watchdog = watchdog
        self._outputs: dict[tuple[int, str], bool] = {}

    def serve(self) -> int:
        """Run rank 0's commands until shutdown (returns 0) or abort (returns 1)."""
        while True:
            try:
                cmd = self.transport.recv(0, CMD)
            except RuntimeError as err:
                logger.error("rank %d: lost contact with rank 0 (the controller): %s", self.rank,
                             err)
                return self._ending(1)
            for cid in cmd.get("release", ()):
                self.store.pop(cid, None)
            op = cmd["op"]
            if op == "shutdown":
                self.transport.flush()
                if self.watchdog is not None:
                    self.watchdog.close()
                return 0
            if op == "abort":
                logger.error("rank %d: aborting because rank 0 failed", self.rank)
                return self._ending(1)
            if op == "send":
                self.send_rows(cmd["fid"], cmd["dst_cid"], cmd["key"], cmd["pieces"])
            elif op == "fetch":
                self._reply(cmd["cid"], "data", "fetch",
                            lambda: {"value": self.store[cmd["cid"]]})
            elif op == "create":
                self._reply(-(cmd["gid"] + 1), "status", f"{cmd['name']}.__init__",
                            lambda: self.create_local(cmd) or {}, send=self.rank in cmd["pool"])
            elif op == "call":
                what = f"{self.groups[cmd['gid']].name}.{cmd['method']}"
                self._reply(cmd["cid"], "status", what, lambda: self._serve_call(cmd, what))

    def _ending(self, code: int) -> int:
        if self.watchdog is not None:
            self.watchdog.ending.set()
        return code

    # ---- a call --------------------------------------------------------------------------------
    def _serve_call(self, cmd: dict, what: str) -> dict:
        if self.watchdog is not None:
            self.watchdog.current_call = (cmd["cid"], what)
        try:
            args, kwargs = self._receive_arguments(cmd)
            if self.watchdog is not None and cmd["cid"] in self.watchdog.interrupted:
                # Rank 0's share already failed: running ours could wait for it forever.
                raise NotRunError(f"not run: rank 0's own share of {what} failed first")
            value = getattr(self.groups[cmd["gid"]].worker, cmd["method"])(*args, **kwargs)
        finally:
            if self.watchdog is not None:
                self.watchdog.current_call = None
        output = self._is_output_rank(cmd["gid"], cmd["method"])
        reply = output_status(value, stored=output and not cmd["eager"])
        if output and cmd["eager"]:
            reply["value"] = value
        elif output:
            self.store[cmd["cid"]] = value
        return reply

    def _is_output_rank(self, gid: int, method: str) -> bool:
        """Whether the protocol collects this rank's output (the same rule rank 0 applies)."""
        key = (gid, method)
        if key not in self._outputs:
            state = self.groups[gid]
            proto = getattr(type(state.worker), method)._hfrl_protocol
            positions = proto.output_positions(state.dims)
            self._outputs[key] = state.pool.ranks.index(self.rank) in positions
        return self._outputs[key]

    def _receive_arguments(self, cmd: dict) -> tuple[tuple, dict]:
        """The relayed piece (forwarded down this rank's tree), then the chained pieces."""
        relayed: dict[str, Any] = {}
        if cmd.get("relay"):
            relay = cmd["relay"]
            if relay["children"]:
                relayed, msg = self.transport.recv(relay["parent"], RELAY, raw=True)
                for child in relay["children"]:
                    self.transport.post(msg, child, RELAY)
            else:    # a leaf: nothing to forward, so no copy to decode from
                relayed = self.transport.recv(relay["parent"], RELAY)
        return self.assemble_arguments(cmd, relayed)

    # ---- replies -------------------------------------------------------------------------------
    def _reply(self, cid: int, kind: str, what: str, fn: Callable[[], dict],
               send: bool = True) -> None:
        try:
            reply = {"ok": True, **fn()}
        except Exception as err:  # noqa: BLE001 - every failure goes back to rank 0
            reply = {"ok": False, "error": (type(err).__name__, str(err), traceback.format_exc())}
        if not send:
            if not reply["ok"]:
                # Nobody waits for this rank's reply, and a rank that missed a collective step
                # must not go on: fail loudly (peers see the connection close).
                raise RuntimeError(f"rank {self.rank}: {reply['error'][2]}")
            return
        message = {"cid": cid, "kind": kind, "rank": self.rank, **reply}
        try:
            msg = self.transport.encode_message(message)
        except Exception as err:  # noqa: BLE001 - an output that cannot be sent is an error too
            reason = (f"the result of {what} cannot be sent to rank 0: "
                      f"{type(err).__name__}: {err}")
            msg = self.transport.encode_message(
                {"cid": cid, "kind": kind, "rank": self.rank, "ok": False,
                 "error": ("UnsendableResult", reason, traceback.format_exc())})
            if kind == "status":
                self.store.pop(cid, None)
        self.transport.post(msg, 0, REPLY)
