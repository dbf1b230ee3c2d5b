"""Stand-ins for the renderer application's handle as `cluster.eval_driver` uses it, without Ray or Serve."""

from __future__ import annotations

import numpy as np

from cluster.serve.renderer import RenderResult


class Response:
    """A DeploymentResponse that is already there."""

    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        return self.value

    def cancel(self):
        pass


class GreyRenderer:
    """Renders every frame mid-grey at the request's size; the info call says ``resolution``; counts the frames
    sent (``sent``)."""

    def __init__(self, resolution: int):
        self.resolution, self.info, self.sent = resolution, self, 0

    def options(self, multiplexed_model_id):
        return self

    def remote(self, request=None):
        if request is None:  # the info call
            return Response({"resolution": self.resolution})
        self.sent += 1
        return Response(RenderResult(np.full((*request.size, 3), 0.45, np.float32), request.key, 1, 0.0))
