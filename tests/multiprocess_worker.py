"""One process of a multi-process run on one machine (run by test_parallel.py, not collected by pytest).

    python multiprocess_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_DIR

Every process joins with `parallel.initialize` on localhost, trains 2 epochs of MTS on the global data
mesh (every device of every process) with checkpoints in OUT_DIR/checkpoints, and builds one global array
from each process's own rows; process 0 writes OUT_DIR/result.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

port, num_processes, process_id, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])

from metasel import parallel  # noqa: E402

parallel.initialize(f"localhost:{port}", num_processes, process_id)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from metasel import runs, train  # noqa: E402
from multiprocess_setting import CONFIG, MODEL, dataset, method  # noqa: E402

mesh = parallel.data_mesh()
result = train.fit(MODEL, dataset(), CONFIG, method(), mesh=mesh, checkpoint_dir=out_dir / "checkpoints")
rows = np.arange(16, dtype=np.float32)[parallel.process_rows(16)]  # this process's block
joined = parallel.global_rows(rows, mesh)
total = float(jax.jit(jnp.sum, out_shardings=parallel.replicated(mesh))(joined))
runs.write_json(out_dir / "result.json", {
    "history": result.history,
    "devices": jax.device_count(),
    "processes": jax.process_count(),
    "local_rows": rows.tolist(),
    "global_sum": total,
})
