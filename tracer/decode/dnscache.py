"""The per-agent DNS name cache: addresses an agent resolved, back to the names it asked for.

Apart from the parser (decode/dns.py) because it holds no DNS code: the enricher makes one at
every start, and importing dnspython with it was ~40 ms of the start (docs/STARTUP.md).
"""
from __future__ import annotations

import ipaddress
import threading
from collections import OrderedDict

from agenttrace.clock import Clock, SystemClock


# -- the per-agent name cache --------------------------------------------------------------------

class NameCache:
    """addr → the name an agent resolved to get it, per agent, bounded and expiring.

    The name kept is the *query* name (what the agent asked for), not the end of a CNAME chain:
    ``pool.example`` CNAME ``cdn.host`` A 1.2.3.4 maps 1.2.3.4 to ``pool.example``, which is
    what pool-domain rules are written against. Entries live for the answer's TTL, clamped to
    [min_ttl, max_ttl]: a TTL of 0 still has to name the connect that follows it at once.
    Least recently used entries are evicted beyond ``max_per_agent``; the least recently
    active agents beyond ``max_agents``. Thread-safe.
    """

    def __init__(self, clock: Clock | None = None, max_per_agent: int = 4096, max_agents: int = 1024,
                 min_ttl: float = 60.0, max_ttl: float = 3600.0):
        if max_per_agent < 1 or max_agents < 1:
            raise ValueError("NameCache bounds must be at least 1")
        if min_ttl < 0 or max_ttl < min_ttl:
            raise ValueError(f"NameCache: need 0 <= min_ttl <= max_ttl, got {min_ttl}, {max_ttl}")
        self.clock = clock or SystemClock()
        self.max_per_agent = max_per_agent
        self.max_agents = max_agents
        self.min_ttl_ns = int(min_ttl * 1e9)
        self.max_ttl_ns = int(max_ttl * 1e9)
        self._agents: OrderedDict[object, OrderedDict[str, tuple[str, int]]] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    @staticmethod
    def _norm_addr(addr: str) -> str:
        return str(ipaddress.ip_address(addr))

    def add(self, agent, addr: str, name: str, ttl: float) -> None:
        """Remember that ``agent`` resolved ``name`` to ``addr`` with this TTL (seconds)."""
        addr = self._norm_addr(addr)
        ttl_ns = min(max(int(ttl * 1e9), self.min_ttl_ns), self.max_ttl_ns)
        expires = self.clock.monotonic_ns() + ttl_ns
        name = name.rstrip(".").lower()
        with self._lock:
            table = self._agents.get(agent)
            if table is None:
                table = self._agents[agent] = OrderedDict()
                while len(self._agents) > self.max_agents:
                    _, dropped = self._agents.popitem(last=False)
                    self.evictions += len(dropped)
            else:
                self._agents.move_to_end(agent)
            table[addr] = (name, expires)
            table.move_to_end(addr)
            while len(table) > self.max_per_agent:
                table.popitem(last=False)
                self.evictions += 1

    def learn(self, agent, parsed: dict) -> int:
        """Feed a parsed response (``parse_message`` output). Returns how many addresses were learnt."""
        if not parsed.get("response") or parsed.get("rcode") not in (None, "NOERROR"):
            return 0
        query = parsed.get("query") or ""
        n = 0
        for a in parsed.get("answers", ()):
            if a.get("type") in ("A", "AAAA"):
                try:
                    self.add(agent, a["data"], query or a["name"], a.get("ttl", 0))
                except ValueError:
                    # not an address (an A record of another class): skipping it must not
                    # cost the answers after it, or a decoy first record hides the name
                    continue
                n += 1
        return n

    def lookup(self, agent, addr: str) -> str | None:
        """The name ``agent`` resolved to reach ``addr``, or None (unknown or expired)."""
        if agent not in self._agents:
            return None     # the common case (no DNS answer seen): skip parsing the address
        try:
            addr = self._norm_addr(addr)
        except ValueError:
            return None
        now = self.clock.monotonic_ns()
        with self._lock:
            table = self._agents.get(agent)
            if table is None:
                return None
            hit = table.get(addr)
            if hit is None:
                return None
            name, expires = hit
            if now >= expires:
                del table[addr]
                return None
            table.move_to_end(addr)
            return name

    def forget_agent(self, agent) -> None:
        with self._lock:
            self._agents.pop(agent, None)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(t) for t in self._agents.values())
