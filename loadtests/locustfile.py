"""Locust load with the runner's request mix: KServe v1 predict of one row, optionally OIP v2 infer.

Locust is not a dependency of this project (nor of its tests); install it where you run it:

    pip install locust
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 --headless -u 50 -r 10 -t 60s

Environment: LOCUST_MODEL (default credit-risk), LOCUST_V2_SHARE (share of requests sent as
v2 infer, 0..1, default 0). Locust's users are closed-loop (each waits for its answer), so under
a stall they send less and latency looks better than it is; `python -m loadtests` is open-loop
and is the one the SLA verdict comes from. Point it only at a gateway on this machine.
"""

# mypy: disable-error-code="misc"
from __future__ import annotations

import json
import os
import random

from loadtests.common import ROW, v2_body

try:
    from locust import FastHttpUser, constant_throughput, task
except ImportError as exc:  # keep the message useful when someone imports this without locust
    raise SystemExit("locust is not installed: pip install locust (see loadtests/locustfile.py)") from exc

MODEL = os.environ.get("LOCUST_MODEL", "credit-risk")
V2_SHARE = float(os.environ.get("LOCUST_V2_SHARE", "0"))
V1_BODY = json.dumps({"instances": [ROW]})
V2_BODY = json.dumps(v2_body(ROW))
HEADERS = {"Content-Type": "application/json"}


class GatewayUser(FastHttpUser):
    """One client sending about one request per second (scale with the number of users)."""

    wait_time = constant_throughput(1.0)

    @task
    def infer(self) -> None:
        """v1 predict, or v2 infer for LOCUST_V2_SHARE of the requests."""
        if V2_SHARE and random.random() < V2_SHARE:
            self.client.post(f"/v2/models/{MODEL}/infer", data=V2_BODY, headers=HEADERS, name="v2 infer")
        else:
            self.client.post(f"/v1/models/{MODEL}:predict", data=V1_BODY, headers=HEADERS, name="v1 predict")
