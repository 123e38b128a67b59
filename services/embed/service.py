"""Embedding: DeViSE / ConSE image embeddings, text embeddings, and zero-shot labelling
with nearest neighbours among every WordNet 3.0 noun (Frome et al. 2013; Norouzi et al.
2014).

Images go through EfficientNet-Lite0 once (pooled features and ImageNet logits); DeViSE
maps the features linearly into the all-MiniLM-L6-v2 word space, ConSE takes the
probability-weighted mean of the top-T class vectors. Both land in the space the text
encoder writes, so words and images compare directly.

``--word-vectors PATH`` (a word2vec, GloVe or fastText ``.vec`` file) replaces that space:
nouns, texts and ConSE's class vectors then come from the file, the noun index holds only
the synsets it covers, and a DeViSE map is used only if it was trained against the same
file (its config.json records the path, sha256, format and dimension); any other installed
map is refused, and DEVISE requests say why (FAILED_PRECONDITION).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import numpy as np
import torch

from percept.v1 import embed_pb2, embed_pb2_grpc, server_pb2
from services.common.alpha import over_white
from services.common.artifacts import (
    Artifact,
    invalid_field,
    list_artifacts,
    load_artifact,
    read_config,
)
from services.common.batching import MicroBatcher
from services.common.device import choose_device, describe
from services.common.errors import (
    Busy,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unimplemented,
    shown,
)
from services.common.image_model import RequestSlot, pixel_budget
from services.common.images import decode_image, probe_size
from services.common.metrics import REJECTED, REQUEST_SLOTS
from services.common.rpc import time_remaining, unary_errors
from services.common.server import ServiceModule
from services.common.server_info import model_info
from services.common.texts import is_blank
from services.embed.preprocess import DECODE_MIN_SIDE, INPUT_SIZE, preprocess
from services.embed.word_vectors import (
    TextEncoder,
    UnknownWords,
    describe_source,
    load_noun_space,
    space_name,
    vector_space_mismatch,
)
from services.embed.wordnet import NounVocabulary, imagenet_indices
from training.nets.devise import conse_embed
from training.nets.efficientnet_lite import (
    EfficientNetLite0,
    fold_batch_norms,
    load_efficientnet_lite0,
)

log = logging.getLogger("percept.embed")

#: ConSE's T where no installed DeViSE map records one (config.json methods.conse.top_t,
#: which `percept train devise --top-t` writes and `percept eval devise` scores with)
CONSE_TOP_T = 10
MAX_TEXT_CHARS = 1000
#: The most word pieces ([CLS] and [SEP] included) of a text all-MiniLM-L6-v2 reads: its
#: sentence-transformers default window. A longer text is refused, not silently cut (the
#: noun vectors were made with a 64-piece window, which none of the 1000-character texts a
#: request may send would fit).
MAX_TEXT_TOKENS = 256
MAX_K = 100
DEFAULT_K = 5
#: A wnid: "n" and 8 ASCII digits, matched whole (re.fullmatch: no "\n" after it, and
#: [0-9], not \d, which takes any Unicode digit)
_WNID = re.compile(r"n[0-9]{8}")
#: ConSE's version in percept.v1.ServerInfo: it has no artifact of its own (the pinned
#: ImageNet EfficientNet-Lite0 and T make it, both in its name), so 1 until its recipe changes
CONSE_VERSION = 1
DEVISE, CONSE = embed_pb2.EMBEDDING_METHOD_DEVISE, embed_pb2.EMBEDDING_METHOD_CONSE
_METHOD_NAMES = {DEVISE: "devise", CONSE: "conse"}


def devise_methods(artifact: Artifact, classes: int) -> tuple[str, int | None]:
    """The default method a DeViSE artifact names (``"conse"`` or ``"devise"``) and the
    ConSE T it was scored with (None: not recorded), checked: ArtifactError naming the
    artifact for values the service cannot use."""
    config = artifact.config
    preferred = config.get("default_method", "conse")
    if preferred not in _METHOD_NAMES.values():
        raise invalid_field(artifact.path, f"'default_method' is {preferred!r}: it must be "
                                           f"one of {sorted(_METHOD_NAMES.values())}")
    methods = config.get("methods", {})
    conse = methods.get("conse", {}) if isinstance(methods, dict) else None
    if not isinstance(conse, dict):
        raise invalid_field(artifact.path, "'methods' must be an object whose 'conse' is an "
                                           "object")
    top_t = conse.get("top_t")
    if top_t is not None and (not isinstance(top_t, int) or isinstance(top_t, bool)
                              or not 1 <= top_t <= classes):
        raise invalid_field(artifact.path, f"'methods.conse.top_t' is {top_t!r}: it must be "
                                           f"a whole number from 1 to {classes}")
    return preferred, top_t


def serving_backbone(device: torch.device) -> EfficientNetLite0:
    """The ImageNet EfficientNet-Lite0 as this service runs it: a copy with its BatchNorms
    folded into the convolutions (fold_batch_norms; eval mode only, which is all a
    server needs), so that the cached module training code shares stays as it is."""
    return fold_batch_norms(load_efficientnet_lite0(device))


def _too_many_tokens(index: int, count: int, one: bool) -> InvalidArgument:
    what = "text" if one else f"text {index}"
    return InvalidArgument(f"{what} is {count} word pieces long, over the text encoder's "
                           f"window of {MAX_TEXT_TOKENS} (about 190 English words): a longer "
                           "text would be cut, so shorten it", field=f"texts[{index}]")


@dataclass(frozen=True)
class _Job:
    pixels: np.ndarray  # (224, 224, 3) uint8
    method: int
    mask_imagenet_class: bool = False


class EmbeddingService(ServiceModule, embed_pb2_grpc.EmbeddingServicer):
    name = "embed"
    full_name = "percept.v1.Embedding"

    devise: Artifact | None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        embed_pb2_grpc.add_EmbeddingServicer_to_server(self, server)

    @property
    def max_images(self) -> int:
        """The most images (or phrases) one EmbedImages (EmbedText) request may carry."""
        return self.config.max_batch * 8

    async def load(self) -> None:
        self.device = choose_device(self.config.device)
        self.vocab = await asyncio.to_thread(NounVocabulary.from_file)
        self.space = await asyncio.to_thread(
            load_noun_space, self.vocab, self.config.word_vectors or None,
            self.config.word_vectors_format, encoder=TextEncoder(device=self.device.type),
            progress=False, log=log.info)
        self.text = self.space.encoder
        self.index = await asyncio.to_thread(self.space.index, backend="flat")
        self.imagenet_rows = imagenet_indices(self.vocab)
        self.class_vectors = torch.from_numpy(
            self.space.matrix[self.imagenet_rows]).to(self.device)
        # ConSE combines only classes that have a vector in this space
        self.class_weights = torch.from_numpy(
            self.space.covered[self.imagenet_rows].astype(np.float32)).to(self.device)
        self.backbone = await asyncio.to_thread(serving_backbone, self.device)
        self.pixels = pixel_budget(self.config)
        self.image_requests = 0  # EmbedImages/LabelImage calls reading or decoding images
        self.devise = None
        self.devise_refused: dict[str, str] = {}
        not_served: list[str] = []
        for name in list_artifacts(self.config.models_dir, "devise"):
            recorded = read_config(self.config.models_dir / name).get("noun_vectors")
            reason = vector_space_mismatch(recorded, self.space.source)
            if reason is not None:  # the client is told it without the server's folders
                self.devise_refused[name] = str(vector_space_mismatch(
                    recorded, self.space.source, describe=space_name))
                log.error(f"DeViSE map {name} refused: {reason}", extra={"devise": name})
            elif self.devise is not None:
                not_served.append(name)
            else:
                self.devise = await asyncio.to_thread(load_artifact, self.config.models_dir,
                                                      name, self.device)
        if not_served:
            assert self.devise is not None
            log.warning(f"several DeViSE maps fit this word space: {self.devise.path.name} "
                        f"is served (the first by folder name), not {', '.join(not_served)}; "
                        "keep the one to serve in --models-dir",
                        extra={"devise": self.devise.path.name})
        preferred, recorded_t = (devise_methods(self.devise, len(self.imagenet_rows))
                                 if self.devise is not None else ("conse", None))
        # the T the installed map's evaluation scored ConSE with
        self.conse_top_t = recorded_t or CONSE_TOP_T
        self.default_method = DEVISE if preferred == "devise" and self.devise else CONSE
        # Its items are images, decoded already: --max-queue bounds the image *requests*
        # (image_requests, before decoding), and every image of an admitted request has a
        # place here, or a request of more images than --max-queue would be busy forever
        self.batcher: MicroBatcher[_Job, np.ndarray] = MicroBatcher(
            "embed-images", self._embed_batch, max_batch=self.config.max_batch,
            max_wait_ms=self.config.max_wait_ms,
            max_queue=self.config.max_queue * self.max_images,
            stall_seconds=self.config.stall_seconds or None)
        self.batcher.start()
        # phrases: one item per request (its phrases), encoded together with the phrases of
        # the requests that came with it, in one thread, behind the same bounded queue
        self.text_batcher: MicroBatcher[tuple[str, ...], np.ndarray | ServiceError] = \
            MicroBatcher("embed-text", self._encode_requests, max_batch=self.config.max_batch,
                         max_wait_ms=self.config.max_wait_ms, max_queue=self.config.max_queue,
                         stall_seconds=self.config.stall_seconds or None)
        self.text_batcher.start()
        log.info("embed loaded", extra={
            "device": describe(self.device), "nouns": len(self.index),
            "space": describe_source(self.space.source),
            "devise": self.devise.tag if self.devise else None,
            "default_method": _METHOD_NAMES[self.default_method],
            "conse_top_t": self.conse_top_t})

    async def warmup(self) -> None:
        blank = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
        await asyncio.to_thread(self._embed_batch, [_Job(blank, self.default_method)])
        if isinstance(self.text, TextEncoder):  # a word-vector file loads eagerly
            await asyncio.to_thread(self.text.encode, ["warm-up"])

    def model_infos(self) -> list[server_pb2.ModelInfo]:
        """Both methods, each under the name EmbedImagesResponse.model gives it (ConSE's
        ``conse-efficientnet-lite0-top{T}``, version CONSE_VERSION; the DeViSE map, where
        one is served, by its artifact), the default method's with is_default."""
        conse = self.image_model(CONSE)
        infos = [model_info(self.full_name, conse, conse, CONSE_VERSION,
                            is_default=self.default_method == CONSE)]
        if self.devise is not None:
            infos.append(model_info(self.full_name, self.devise.name, self.devise.name,
                                    self.devise.version,
                                    is_default=self.default_method == DEVISE))
        return infos

    def batchers(self) -> list[MicroBatcher[Any, Any]]:
        return [b for b in (getattr(self, "batcher", None), getattr(self, "text_batcher", None))
                if b is not None]

    async def close(self) -> None:
        for batcher in self.batchers():
            await batcher.stop()

    # -- compute -------------------------------------------------------------------------
    def _embed_batch(self, jobs: Sequence[_Job]) -> list[np.ndarray]:
        pixels = torch.from_numpy(np.stack([job.pixels for job in jobs])).to(self.device)
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            features = self.backbone.features(x)
            method = jobs[0].method  # batches are keyed by method
            if method == DEVISE:
                assert self.devise is not None
                vectors = self.devise.module(features)
            else:
                probabilities = torch.softmax(self.backbone._fc(features), dim=1)
                probabilities = probabilities * self.class_weights
                vectors = conse_embed(probabilities, self.class_vectors, self.conse_top_t)
        return list(vectors.float().cpu().numpy())

    def image_model(self, method: int) -> str:
        """What maps images into word space by ``method`` (a method :meth:`_method` chose):
        the DeViSE map's artifact tag, or ConSE's backbone and T. Its image vectors compare
        only with vectors of the same space and model (EmbedImagesResponse.model)."""
        if method == DEVISE:
            assert self.devise is not None
            return self.devise.tag
        # its backbone (the pinned ImageNet classifier) and T
        return f"conse-efficientnet-lite0-top{self.conse_top_t}"

    def _method(self, method: int) -> int:
        if method == embed_pb2.EMBEDDING_METHOD_UNSPECIFIED:
            return self.default_method
        if method not in _METHOD_NAMES:
            raise InvalidArgument(f"unknown method {method}", field="method")
        if method == DEVISE and self.devise is None and self.devise_refused:
            raise FailedPrecondition(
                "no installed DeViSE map fits this service's vectors, "
                f"{space_name(self.space.source)}: "
                + "; ".join(f"{n}: {r}" for n, r in self.devise_refused.items())
                + "; train one for these vectors with `percept train devise --word-vectors "
                  "PATH` (or serve the vectors it was trained on), or use method CONSE",
                reason="DEVISE_SPACE_MISMATCH", field="method")
        if method == DEVISE and self.devise is None:
            raise Unimplemented("no DeViSE map is installed in this server's --models-dir; use "
                                "method CONSE or train one with `percept train devise`",
                                field="method")
        return method

    async def embed_images(self, images: Sequence[bytes], method: int = 0,
                           timeout: float | None = None) -> list[np.ndarray]:
        """Unit vectors for encoded images (the in-process API the search service uses),
        within ``timeout`` seconds from now (the call's deadline: reading and decoding the
        images take from it, and the batcher gets what is left).
        Raises InvalidArgument naming the first bad image, and Busy when decoding the
        largest would take the server over --max-inflight-mpixels."""
        deadline = None if timeout is None else time.monotonic() + timeout
        method = self._method(method)
        whats = ["image" if len(images) == 1 else f"image {i}" for i in range(len(images))]

        def decode_one(data: bytes, what: str) -> np.ndarray:
            decoded = decode_image(data, max_pixels=self.config.max_pixels, what=what,
                                   srgb=True, draft_min_side=DECODE_MIN_SIDE)
            # a transparent logo is what it looks like on a page, not its hidden colour
            return preprocess(over_white(decoded.rgb, decoded.alpha))

        def decode() -> list[np.ndarray]:
            return [decode_one(data, what) for what, data in zip(whats, images, strict=True)]

        # One of --max-queue image-request slots is held from before the headers are read
        # (off the event loop: a crafted PNG or JPEG takes seconds) until the decode thread
        # ends, even if the request is cancelled first. The images are decoded one at a
        # time, so the largest is what the decode holds at once: it is taken from the
        # process's pixel budget (--max-inflight-mpixels, shared with the style and
        # super-resolution services) before decoding.
        if self.image_requests >= self.config.max_queue:
            REJECTED.labels("embed-images").inc()
            raise Busy(f"the embedding service is busy ({self.config.max_queue} image "
                       "requests in progress); retry with backoff",
                       retry_after_ms=self.batcher.retry_after_ms)
        self.image_requests += 1
        REQUEST_SLOTS.labels("embed-images").inc()
        slot = RequestSlot(lambda: self._release_image_request(slot.pixels))
        try:
            sizes = await slot.to_thread(
                lambda: [probe_size(data, what)
                         for what, data in zip(whats, images, strict=True)])
            slot.pixels = self._take_pixels(sizes)
            pixels = await slot.to_thread(decode)
        finally:
            slot.close()
        # the time left now, after the decode: the batcher's deadline is the call's, so a
        # request that runs out of time while queued is dropped (and counted) as a deadline
        left = None if deadline is None else deadline - time.monotonic()
        # a request of one batch at most (a LabelImage) goes ahead of larger ones' images
        # (search's AddImages batches of 16), batching.py
        small = len(pixels) <= self.batcher.max_batch
        jobs = [asyncio.ensure_future(self.batcher.submit(_Job(p, method), key=method,
                                                          timeout=left, small=small))
                for p in pixels]
        try:
            return list(await asyncio.gather(*jobs))
        except BaseException:  # one image refused (a full queue): the others are dropped
            for job in jobs:
                job.cancel()
            raise

    def _release_image_request(self, pixels: int) -> None:
        self.image_requests -= 1
        REQUEST_SLOTS.labels("embed-images").dec()
        if pixels:
            self.pixels.give(pixels)

    def _take_pixels(self, sizes: Sequence[tuple[int, int]]) -> int:
        """Takes the largest image's pixels (as its header states them) from the pixel
        budget, or refuses the request as busy; returns what it took. One over --max-pixels
        counts as none (decoding refuses it with its precise error)."""
        largest = 0
        for width, height in sizes:
            if width * height <= self.config.max_pixels:
                largest = max(largest, width * height)
        if not largest:  # nothing will be decoded
            return 0
        if not self.pixels.take(largest):
            REJECTED.labels("embed-images").inc()
            raise self.pixels.busy(largest, self.batcher.retry_after_ms)
        return largest

    # -- RPCs ----------------------------------------------------------------------------
    @unary_errors
    async def EmbedImages(self, request: embed_pb2.EmbedImagesRequest,
                          context: grpc.aio.ServicerContext) -> embed_pb2.EmbedImagesResponse:
        if not request.images:
            raise InvalidArgument("images is empty: send 1 to "
                                  f"{self.max_images} images", field="images")
        if len(request.images) > self.max_images:
            raise InvalidArgument(f"{len(request.images)} images is over the batch limit of "
                                  f"{self.max_images}", field="images")
        method = self._method(request.method)
        try:
            vectors = await self.embed_images(request.images, method, time_remaining(context))
        except InvalidArgument as error:
            if error.field == "image":  # a batch of one: its image is images[0] here
                error.field = "images[0]"
            raise
        return embed_pb2.EmbedImagesResponse(
            embeddings=[embed_pb2.Vector(values=v.tolist()) for v in vectors],
            dimension=self.index.dimension, method=method, space=self.text.name,
            model=self.image_model(method))

    async def embed_texts(self, texts: Sequence[str], timeout: float | None = None
                          ) -> np.ndarray:
        """(N, 384) unit vectors for phrases (validated like EmbedText), within ``timeout``
        seconds; Busy when --max-queue text requests are already waiting or running."""
        limit = self.max_images
        if not texts:
            raise InvalidArgument(f"texts is empty: send 1 to {limit} phrases", field="texts")
        if len(texts) > limit:
            raise InvalidArgument(f"{len(texts)} texts is over the batch limit of {limit}",
                                  field="texts")
        for i, text in enumerate(texts):
            if len(text) > MAX_TEXT_CHARS:  # first: is_blank reads every character
                raise InvalidArgument(f"text {i} has {len(text)} characters, over the limit "
                                      f"of {MAX_TEXT_CHARS}", field=f"texts[{i}]")
            if is_blank(text):
                raise InvalidArgument(f"text {i} is empty (nothing but spaces or invisible "
                                      "characters)" if text else f"text {i} is empty",
                                      field=f"texts[{i}]")
        vectors = await self.text_batcher.submit(tuple(texts), timeout=timeout)
        if isinstance(vectors, ServiceError):
            raise vectors
        return vectors

    def _encode_requests(self, requests: Sequence[tuple[str, ...]]
                         ) -> list[np.ndarray | ServiceError]:
        """The phrases of several requests in one encoder call; a request with a phrase
        the vectors cannot embed gets its error, the others their vectors."""
        answers: list[np.ndarray | ServiceError | None] = [None] * len(requests)
        if isinstance(self.text, TextEncoder):  # a text past the encoder's window is refused
            counts = iter(self.text.token_counts([t for texts in requests for t in texts]))
            for r, texts in enumerate(requests):
                over = [(i, n) for i, n in ((i, next(counts)) for i in range(len(texts)))
                        if n > MAX_TEXT_TOKENS]
                if over:
                    answers[r] = _too_many_tokens(*over[0], one=len(texts) == 1)
        todo = [r for r, answer in enumerate(answers) if answer is None]
        if not todo:
            return cast(list[np.ndarray | ServiceError], answers)
        try:
            vectors = self._encode([text for r in todo for text in requests[r]])
        except ValueError:  # word vectors: a text none of whose words has one
            for r in todo:
                answers[r] = self._encode_one_request(requests[r])
        else:
            ends = np.cumsum([len(requests[r]) for r in todo])
            for r, part in zip(todo, np.split(vectors, ends[:-1]), strict=True):
                answers[r] = part
        assert all(answer is not None for answer in answers)
        return cast(list[np.ndarray | ServiceError], answers)

    def _encode(self, texts: list[str]) -> np.ndarray:
        if isinstance(self.text, TextEncoder):
            return self.text.encode(texts, max_tokens=MAX_TEXT_TOKENS)
        return self.text.encode(texts)

    def _encode_one_request(self, texts: tuple[str, ...]) -> np.ndarray | ServiceError:
        try:
            return np.asarray(self._encode(list(texts)))
        except UnknownWords as error:  # named as the other text errors name it, and its
            # space as EmbedTextResponse.space does (not the file's path on this server)
            what = "text" if len(texts) == 1 else f"text {error.index}"
            return InvalidArgument(f"{what} {shown(error.text, 60)}: none of its words is in "
                                   f"the word vectors of {self.text.name}",
                                   field=f"texts[{error.index}]")
        except ValueError as error:
            return InvalidArgument(str(error))

    @unary_errors
    async def EmbedText(self, request: embed_pb2.EmbedTextRequest,
                        context: grpc.aio.ServicerContext) -> embed_pb2.EmbedTextResponse:
        vectors = await self.embed_texts(list(request.texts), time_remaining(context))
        return embed_pb2.EmbedTextResponse(
            embeddings=[embed_pb2.Vector(values=v.tolist()) for v in vectors],
            dimension=int(vectors.shape[1]), space=self.text.name)

    def _nearest_nouns(self, vector: np.ndarray, k: int, restrict: Any, exclude: Any,
                       one_per_word: bool) -> list[tuple[float, int]]:
        """(score, vocabulary row) of the k nearest nouns, best first; with
        ``one_per_word``, only the best of the synsets sharing a first lemma, searching
        ever deeper (4k, 16k ... nouns) until k different words are found or none is left."""
        fetch = k * 4 if one_per_word else k
        while True:
            scores, rows = self.index.search(vector[None], fetch, restrict=restrict,
                                             exclude=exclude)
            found = [(float(score), int(row)) for score, row in zip(scores[0], rows[0],
                                                                    strict=True) if row >= 0]
            if not one_per_word:
                return found
            words: dict[str, tuple[float, int]] = {}
            for score, row in found:
                words.setdefault(self.vocab[row].lemmas[0].lower(), (score, row))
            if len(words) >= k or len(found) < fetch or fetch >= len(self.index):
                return list(words.values())[:k]
            fetch = min(fetch * 4, len(self.index))

    def _nouns_under(self, vector: np.ndarray, k: int, under_wnid: str | None, exclude: Any,
                     one_per_word: bool) -> list[tuple[float, int]]:
        """:meth:`_nearest_nouns` among the hyponyms of ``under_wnid`` (None: every noun).
        In a worker thread, never on the event loop: the rows under a wnid not asked for
        lately are a walk of the graph in pure Python (14-32 ms for the root, 82,115 nouns;
        cached after, ``NounVocabulary.hyponym_rows``), which held up every other call of
        the process, health checks included."""
        restrict = None if under_wnid is None else self.vocab.hyponym_rows(under_wnid)
        return self._nearest_nouns(vector, k, restrict, exclude, one_per_word)

    @unary_errors
    async def LabelImage(self, request: embed_pb2.LabelImageRequest,
                         context: grpc.aio.ServicerContext) -> embed_pb2.LabelImageResponse:
        k = request.k or DEFAULT_K
        if not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k must be 1..{MAX_K}, got {request.k}", field="k")
        if request.under_wnid:
            if not _WNID.fullmatch(request.under_wnid):
                raise InvalidArgument(f"under_wnid {shown(request.under_wnid)} is not a wnid "
                                      "('n' and 8 digits 0-9, e.g. n00015388)", field="under_wnid")
            if request.under_wnid not in self.vocab:
                raise NotFound(f"{request.under_wnid} is not a WordNet 3.0 noun synset",
                               reason="SYNSET_NOT_FOUND", field="under_wnid")
        method = self._method(request.method)
        # the image first: one that does not decode is refused before any search work
        vector = (await self.embed_images([request.image], method, time_remaining(context)))[0]
        exclude = self.imagenet_rows if request.zero_shot else None
        found = await asyncio.to_thread(self._nouns_under, vector, k,
                                        request.under_wnid or None, exclude,
                                        request.one_per_word)
        labels = []
        for score, row in found:
            synset = self.vocab[row]
            labels.append(embed_pb2.Label(wnid=synset.wnid, lemmas=list(synset.lemmas),
                                          gloss=synset.gloss, score=score))
        return embed_pb2.LabelImageResponse(labels=labels, method=method,
                                            model=self.image_model(method))
