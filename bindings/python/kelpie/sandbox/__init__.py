"""kelpie.sandbox: run untrusted commands and code snippets in a bubblewrap
sandbox that nothing escapes and that always comes back with a Verdict.

    verdict = await kelpie.sandbox.run(Spec(runtime="python3", code="print(1)"))

    async with kelpie.sandbox.SlotPool(slots=2) as pool:      # warm sandboxes
        verdict = await pool.run(Spec(argv=["sh", "-c", "echo hi"]),
                                 limits={"wall": 5}, on_output=callback)
        ex = await pool.execute(Spec(argv=["cat"], interactive=True))
        await ex.write_stdin(b"hello\\n"); await ex.close_stdin()
        verdict = await ex.wait()

The threat model, the limits, the verdict and how each attack is stopped are
in docs/sandbox.md."""

from ._limits import Limits
from ._pool import MAX_LIMITS, SlotPool, run
from ._sandbox import Execution, SandboxError
from ._spec import RUNTIMES, Spec
from ._verdict import STATUSES, Verdict

__all__ = ["Execution", "Limits", "MAX_LIMITS", "RUNTIMES", "STATUSES", "SandboxError",
           "SlotPool", "Spec", "Verdict", "run"]
