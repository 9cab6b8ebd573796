"""``elta serve``: an HTTP scoring service with dynamic batching and a page to drop photos on.

FastAPI and uvicorn are optional (``pip install 'elta[serve]'``); they are imported when an app is created.
"""

from elta.workflows.serve.app import ServeSettings, create_app, model_info, serve
from elta.workflows.serve.batcher import Batcher

__all__ = ["Batcher", "ServeSettings", "create_app", "model_info", "serve"]
