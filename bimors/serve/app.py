"""The HTTP application: a FastAPI ingress in front of the captioner and classifier deployments.

Routes (all but ``/health`` need ``Authorization: Bearer <token>`` when a token is configured):

* ``GET  /health``                      liveness/readiness
* ``GET  /model``                       classes, backbone, method, MLflow version
* ``POST /classify/tile?top_k=5``       body: image bytes -> top-k classes with probabilities + caption
* ``POST /classify/scene``              body: JSON ``{"url": "s3://..."}`` or scene bytes -> a job id;
                                        URLs only under ``serve.scene_sources`` (else 403)
* ``GET  /jobs/{job_id}``               the job's state, progress and, when done, its outputs

A scene job is Ray work of its own (:mod:`bimors.serve.scene_jobs`): a detached runner drives the
nightly job's tile pipeline for that scene, so a restarted or replaced ingress replica neither
stops nor forgets it. Job status lives in object storage (``serve.output``/jobs/<id>/status.json),
so any ingress replica answers a poll, and a job whose runner died is reported ``failed``.

``build_app`` is the import path for ``serve run``/``serve deploy`` and KubeRay's RayService:
``bimors.serve.app:build_app`` with args ``{config: ..., model: ..., overrides: [...]}``.

(No ``from __future__ import annotations`` here: FastAPI reads the route signatures' annotations
at runtime, through Serve's class wrapper, and needs real types rather than strings.)
"""


import asyncio
import json
import logging
import secrets
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from bimors import storage
from bimors.config import Config, load_config
from bimors.data.decode import DecodeError, ImageTooLargeError
from bimors.data.tiles import tile_from_bytes
from bimors.pinned_model import PinnedModel, pin_model
from bimors.serve import scene_jobs
from bimors.serve.deployments import CaptionerDeployment, ClassifierDeployment
from bimors.serve.scene_sources import SceneSources, SceneSourceRefused

log = logging.getLogger(__name__)
api = FastAPI(title="bimors", description="BiMoRS remote-sensing scene classification")

_SCENE_SUFFIX = {b"II*\x00": ".tif", b"MM\x00*": ".tif", b"II+\x00": ".tif", b"MM\x00+": ".tif", b"\x89PNG": ".png"}


class PayloadTooLarge(HTTPException):
    def __init__(self, detail: str):
        super().__init__(status_code=413, detail=detail)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes: from the
    Content-Length header when there is one, else while streaming, without buffering the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload of {int(declared):,} bytes is over the limit of {limit:,} bytes (serve.max_upload_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"upload is over the limit of {limit:,} bytes (serve.max_upload_bytes)")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise HTTPException(status_code=400, detail="empty request body: send the image bytes")
    return body


@serve.deployment(name="BimorsAPI")
@serve.ingress(api)
class BimorsAPI:
    def __init__(self, cfg: Config, captioner: DeploymentHandle, classifier: DeploymentHandle, model: PinnedModel):
        self.cfg = cfg
        self.token = cfg.serve.token()
        self.sources = SceneSources(cfg.serve.scene_sources)
        self.captioner = captioner
        self.classifier = classifier
        self.model = model  # scene jobs load exactly what the classifier replicas serve
        self._info: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------------- auth

    def authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.token.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.classifier.info.remote()
        return self._info

    # -------------------------------------------------------------------------------------- routes

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/model")
    async def model(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        return await self.info()

    @api.post("/classify/tile")
    async def classify_tile(self, request: Request, top_k: int | None = Query(None, ge=1)) -> dict[str, Any]:
        self.authorize(request)
        body = await read_body(request, self.cfg.serve.max_upload_bytes)
        decode_cfg = self.cfg.data.decode.model_copy(update={"max_pixels": min(self.cfg.data.decode.max_pixels, self.cfg.serve.max_scene_pixels)})
        try:
            image = await asyncio.to_thread(tile_from_bytes, body, decode_cfg, self.cfg.featurize.max_side)
        except ImageTooLargeError as err:
            raise PayloadTooLarge(str(err)) from None
        except DecodeError as err:
            raise HTTPException(status_code=422, detail=f"not a usable image: {err}") from None
        probs, caption = await self._classify(image)
        classes = (await self.info())["classes"]
        k = min(top_k or self.cfg.serve.top_k, len(classes))
        best = np.argsort(-probs)[:k]
        return {
            "top": [{"class": classes[i], "probability": float(probs[i])} for i in best],
            "caption": caption,
            "size": list(image.shape[:2]),
        }

    @api.post("/classify/scene", status_code=202)
    async def classify_scene(self, request: Request) -> JSONResponse:
        self.authorize(request)
        from bimors.pipelines.scene import SceneError, SceneReader, SceneTooLargeError

        job_id = uuid.uuid4().hex[:16]
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                url = str(json.loads(await read_body(request, 64 * 1024))["url"])
            except (ValueError, KeyError, TypeError):
                raise HTTPException(status_code=400, detail='expected JSON {"url": "<scene URI>"}') from None
            try:
                url = self.sources.check(url)
            except SceneSourceRefused as err:
                raise HTTPException(status_code=403, detail=str(err)) from None
        else:
            body = await read_body(request, self.cfg.serve.max_upload_bytes)
            suffix = _SCENE_SUFFIX.get(body[:4], ".jpg" if body[:3] == b"\xff\xd8\xff" else None)
            if suffix is None:
                raise HTTPException(status_code=422, detail="not a scene image: expected GeoTIFF/TIFF, PNG or JPEG bytes")
            url = storage.join(scene_jobs.job_dir(self.cfg, job_id), "input" + suffix)
            await asyncio.to_thread(storage.write_bytes, url, body, self.cfg.storage)
        def scene_size() -> list[int]:
            # opened and closed in one worker thread: s3fs must not run its I/O on the event loop
            with SceneReader(url, self.cfg.scene, self.cfg.storage, self.cfg.serve.max_scene_pixels) as reader:
                return [reader.height, reader.width]

        try:  # open it now, so that a bad scene is a 4xx on this request rather than a failed job
            size = await asyncio.to_thread(scene_size)
        except SceneTooLargeError as err:
            raise PayloadTooLarge(str(err)) from None
        except SceneError as err:
            raise HTTPException(status_code=422, detail=str(err)) from None
        except storage.StorageError as err:
            raise HTTPException(status_code=400, detail=f"cannot read the scene: {err}") from None
        status = {"job_id": job_id, "state": "queued", "scene": url, "size": size, "submitted": scene_jobs.now()}
        await asyncio.to_thread(scene_jobs.start_job, self.cfg, self.model, status)
        return JSONResponse(status, status_code=202, headers={"Location": f"/jobs/{job_id}"})

    @api.get("/jobs/{job_id}")
    async def job(self, job_id: str, request: Request) -> dict[str, Any]:
        self.authorize(request)
        if not job_id.isalnum() or len(job_id) > 64:
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        status = await asyncio.to_thread(scene_jobs.job_status, self.cfg, job_id)
        if status is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
        return status

    # ------------------------------------------------------------------------------------ internals

    async def _classify(self, image: np.ndarray) -> tuple[np.ndarray, str]:
        """One tile through both deployments (each batches across concurrent requests)."""
        needs_captions = (await self.info())["needs_captions"]
        caption, embedding = ("", None)
        if needs_captions:
            caption, embedding = await self.captioner.caption.remote(image)
        probs = await self.classifier.classify.remote((image, embedding))
        return probs, caption


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder: ``{"config": path, "model": URI, "overrides": ["key=value", ...]}``.
    The model is pinned here, once per deploy, so every replica serves the same version."""
    if not args.get("model"):
        raise ValueError("build_app needs a 'model' argument: models:/name@alias, runs:/<id>/model or a checkpoint URI")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(args.get("config"), overrides)
    return compose(cfg, pin_model(str(args["model"]), cfg))


#: Deployment name -> its section under ``serve`` in the config (replicas and resources).
DEPLOYMENT_CONFIG_KEYS = {"BimorsAPI": "ingress", "Captioner": "captioner", "Classifier": "classifier"}


def compose(cfg: Config, model: PinnedModel) -> serve.Application:
    """The three deployments with their replicas, resources and autoscaling from ``cfg.serve``."""
    s = cfg.serve

    def options(replicas: Any) -> dict[str, Any]:
        return {
            "autoscaling_config": replicas.autoscaling(),
            "ray_actor_options": {"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus},
            "max_ongoing_requests": max(8, int(getattr(replicas, "max_batch_size", 8) * 2)),
        }

    captioner = CaptionerDeployment.options(**options(s.captioner)).bind(cfg)
    classifier = ClassifierDeployment.options(**options(s.classifier)).bind(cfg, model)
    ingress_options = options(s.ingress) | {"max_ongoing_requests": 64}
    return BimorsAPI.options(**ingress_options).bind(cfg, captioner, classifier, model)
