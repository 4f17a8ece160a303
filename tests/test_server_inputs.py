"""Property tests without a model, of everything a client controls at the unit level: binary framing,
client events and their error classification, settings bounds against what the sampler computes,
image payloads, the container reader's byte cap. Hypothesis example counts are kept modest."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from server_helpers import jpeg, png, world_frames

from casa_live.model.engine.engine import SessionSettings as EngineSettings
from casa_live.model.engine.sampling import Sampler, SamplingParams
from casa_live.model.engine.settings import MIN_TEMPERATURE, SETTING_BOUNDS
from casa_live.server import protocol as p
from casa_live.server.errors import CasaError, from_validation_error, report
from casa_live.server.ingest import FrameLimits, decode_image
from casa_live.server.ingest.container import ChunkReader, mp4_init_bytes
from casa_live.server.metrics import Metrics

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY_CHAR = st.characters(codec=None, categories=None)  # surrogates and control characters included
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(ANY_CHAR, max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(ANY_CHAR, max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)


def client_texts() -> st.SearchStrategy[str]:
    field = st.sampled_from([*p.SessionSettings.model_fields, *p.InputSettings.model_fields, "nope"])
    settings_dict = st.dictionaries(field, JSON_VALUES, max_size=4)
    event = st.fixed_dictionaries(
        {"type": st.sampled_from([*p.CLIENT_EVENT_TYPES, "x.y", ""]) | JSON_VALUES},
        optional={
            "event_id": JSON_VALUES | st.text(ANY_CHAR, min_size=100, max_size=300),
            "session": settings_dict | JSON_VALUES,
            "input": settings_dict | JSON_VALUES,
            "id": JSON_VALUES | st.text(ANY_CHAR, max_size=300),
        },
    )
    depth = st.integers(1, 20_000)
    return st.one_of(
        event.map(json.dumps),
        JSON_VALUES.map(json.dumps),
        st.text(ANY_CHAR, max_size=200),
        depth.map(lambda n: "[" * n + "]" * n),
        depth.map(lambda n: '{"type": "session.update", "session": ' * n + "1" + "}" * n),
        st.integers(0, 70_000).map(lambda n: json.dumps({"type": "input.marker", "id": "m" * n})),
        st.integers(0, 70_000).map(lambda n: json.dumps({"type": "session.update", "event_id": "e" * n})),
    )


@FAST
@given(client_texts())
def test_any_client_text_is_an_event_or_a_typed_error(text):
    """Whatever the text, parsing gives an event or a CasaError, and the error event it makes is valid
    (it serialises, its echoed event_id fits the schema)."""
    from casa_live.server.session import _parse

    try:
        _parse(text)
    except CasaError as exc:
        event, close = report(exc, Metrics())
        assert close is None and not event.fatal
        assert p.parse_server_event(p.dump(event)) == event
        assert len(event.message) <= 2000


def test_deep_nesting_and_long_event_ids_are_bad_json_not_internal():
    from casa_live.server.session import _parse

    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        with pytest.raises(CasaError) as err:
            _parse(text)
        assert err.value.code == p.ErrorCode.BAD_JSON
    long_id = json.dumps({"type": "session.update", "event_id": "x" * 500, "session": {"fps": 0}})
    with pytest.raises(CasaError) as err:
        _parse(long_id)
    event, _ = report(err.value, Metrics())
    assert event.event_id is None and event.code == p.ErrorCode.INVALID_SETTINGS


# ---- settings bounds ------------------------------------------------------------------------------

PROTOCOL_BOUNDS = {
    "max_new_tokens": (1, p.MAX_NEW_TOKENS),
    "min_new_tokens": (0, p.MAX_NEW_TOKENS),
    "temperature": (0.0, p.MAX_TEMPERATURE),
    "top_k": (0, p.MAX_TOP_K),
    "repetition_penalty": (1.0, p.MAX_REPETITION_PENALTY),
    "no_repeat_ngram": (0, p.MAX_NO_REPEAT_NGRAM),
    "seed": (0, p.MAX_SEED),
    "top_p": (0.0, 1.0),
    "eos_bias": (p.MIN_EOS_BIAS, p.MAX_EOS_BIAS),
}


def test_protocol_and_engine_bounds_agree():
    assert PROTOCOL_BOUNDS == SETTING_BOUNDS and p.MIN_TEMPERATURE == MIN_TEMPERATURE


def edge_values(lo: float, hi: float) -> st.SearchStrategy:
    edges = [lo, hi, lo - 1, hi + 1, lo - 1e-9, hi + 1e-9, 1e-30, 1e-300, 2**64, 2**70, -(2**63), 1e308]
    return st.sampled_from(edges) | st.floats(allow_nan=True) | st.integers(-(2**66), 2**66)


@FAST
@given(st.data())
def test_every_setting_is_bounded_with_a_message(data):
    field = data.draw(st.sampled_from([*PROTOCOL_BOUNDS, "fps"]))
    lo, hi = PROTOCOL_BOUNDS.get(field, (p.MIN_FPS, p.MAX_FPS))
    value = data.draw(edge_values(lo, hi))
    text = json.dumps({"type": "session.update", "event_id": "u", "session": {field: value}})
    try:
        event = p.parse_client_event(text)
    except ValidationError as exc:
        err = from_validation_error(exc, raw=json.loads(text))
        assert err.code == p.ErrorCode.INVALID_SETTINGS and field in err.message and err.event_id == "u"
        return
    accepted = getattr(event.session, field)
    assert lo <= accepted <= hi
    if field == "temperature":
        assert accepted == 0 or accepted >= MIN_TEMPERATURE
    if field != "fps":
        EngineSettings(**{field: accepted}).validate()  # what the protocol accepts, the engine accepts


def test_temperature_error_names_the_range():
    with pytest.raises(ValidationError) as err:
        p.SessionSettings(temperature=1e-30)
    assert "0.01" in str(err.value) and "greedy" in str(err.value)
    with pytest.raises(ValueError, match="between"):
        EngineSettings(seed=2**64).validate()
    with pytest.raises(ValueError, match="at least"):
        EngineSettings(temperature=1e-30).validate()


@settings(max_examples=40, deadline=None)
@given(
    temperature=st.just(0.0) | st.floats(MIN_TEMPERATURE, p.MAX_TEMPERATURE),
    top_k=st.integers(0, p.MAX_TOP_K),
    penalty=st.floats(1.0, p.MAX_REPETITION_PENALTY),
    ngram=st.integers(0, p.MAX_NO_REPEAT_NGRAM),
    seed=st.integers(0, p.MAX_SEED),
    scale=st.sampled_from([1.0, 1e2, 1e4, 1e6]),
    top_p=st.floats(0.0, 1.0),
    eos_bias=st.floats(p.MIN_EOS_BIAS, p.MAX_EOS_BIAS),
    counts=st.sampled_from(["emitted", "fed"]),
)
def test_the_sampler_computes_every_accepted_setting(
    temperature, top_k, penalty, ngram, seed, scale, top_p, eos_bias, counts
):
    vocab, stop = 64, [0]
    sampler = Sampler(2, vocab, stop)
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        repetition_penalty=penalty,
        no_repeat_ngram=ngram,
        seed=seed,
        top_p=top_p,
        eos_bias=eos_bias,
        counts=counts,
    )
    sampler.reset(0, params)
    sampler.reset(1, SamplingParams())
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        logits = torch.randn(2, vocab, generator=gen) * scale
        tokens = sampler.sample([0, 1], logits, [True, False])
        assert all(0 <= t < vocab for t in tokens)
        for row, tok in enumerate(tokens):
            sampler.observe(row, tok)
            sampler.feed(row, [tok])
        sampler.charge([0], [tokens[0]])


# ---- binary framing -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    kind=st.integers(0, 255),
    pts=st.integers(-(2**63), 2**63 - 1)
    | st.sampled_from([p.MAX_PTS_US, p.MAX_PTS_US + 1, -p.MAX_PTS_US - 1]),
    payload=st.binary(max_size=64),
    cut=st.integers(0, 12),
)
def test_unpack_gives_a_bounded_message_or_a_typed_error(kind, pts, payload, cut):
    message = (bytes([kind]) + struct.pack(">q", pts) + payload)[: 9 + len(payload) - (cut if cut < 9 else 0)]
    try:
        msg = p.unpack(message)
    except p.BinaryMessageError as exc:
        assert str(exc)
        return
    assert msg.kind in tuple(p.BinaryKind) and msg.payload
    if msg.pts_us is not None:
        assert abs(msg.pts_us) <= p.MAX_PTS_US


def test_out_of_range_pts_is_refused_for_every_kind_with_one():
    for pack in (p.pack_image, p.pack_packet):
        with pytest.raises(p.BinaryMessageError, match="2\\*\\*53"):
            p.unpack(pack(b"x", 2**63 - 1))
        assert p.unpack(pack(b"x", -p.MAX_PTS_US)).pts_us == -p.MAX_PTS_US


# ---- images ---------------------------------------------------------------------------------------


def test_pillow_limits_are_left_alone():
    import casa_live.server.ingest  # noqa: F401  (importing the server must not change process-wide state)

    assert PIL.Image.MAX_IMAGE_PIXELS == (1024 * 1024 * 1024 // 4 // 3)


@pytest.fixture(scope="module")
def images():
    frame = world_frames(1)[0]
    return [jpeg(frame), png(frame)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutated_image_decodes_or_is_a_typed_error(images, data):
    image = bytearray(data.draw(st.sampled_from(images)))
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(image) - 1))
        image[at] = data.draw(st.integers(0, 255))
    image = image[: data.draw(st.integers(8, len(image)))]
    limits = FrameLimits(size=24, max_width=4096, max_height=4096)
    try:
        out = decode_image(bytes(image), limits)
    except CasaError as exc:
        assert exc.code in (p.ErrorCode.BAD_FRAME, p.ErrorCode.FRAME_TOO_LARGE, p.ErrorCode.UNSUPPORTED_CODEC)
        return
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def test_huge_declared_dimensions_are_refused_before_decoding():
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0)  # 40 G pixels, a few bytes of data
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
    for limits in (FrameLimits(24, 4096, 4096), FrameLimits(24, 10**6, 10**6)):
        with pytest.raises(CasaError) as err:
            decode_image(bomb, limits)
        assert err.value.code == p.ErrorCode.FRAME_TOO_LARGE


# ---- the container reader's byte cap ----------------------------------------------------------------


class _Chunks:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks, self.pulled = list(chunks), 0

    def pull(self) -> bytes | None:
        if not self.chunks:
            return None
        self.pulled += 1
        return self.chunks.pop(0)


def test_mp4_init_segment_above_the_cap_is_refused_without_buffering_it():
    ftyp = (24).to_bytes(4, "big") + b"ftypisom" + bytes(12)
    moov = (1 << 30).to_bytes(4, "big") + b"moov"
    source = _Chunks([b"\x00" * 65536] * 100)
    reader = ChunkReader(source, cap=1 << 20, first_read=mp4_init_bytes)
    reader.feed(ftyp + moov)
    assert reader.read(4096) == b""  # EOF at once: the declared size is above the cap
    assert reader.failed is not None and reader.failed.code == p.ErrorCode.FRAME_TOO_LARGE
    assert str(24 + (1 << 30)) in reader.failed.message and source.pulled == 0


def test_an_undeclared_init_segment_stops_at_the_cap():
    ftyp = (24).to_bytes(4, "big") + b"ftypisom" + bytes(12)
    free = (1 << 40).to_bytes(8, "big")  # a 64-bit size box, not yet complete
    source = _Chunks([b"\x00" * 65536] * 100)
    reader = ChunkReader(source, cap=1 << 20, first_read=mp4_init_bytes)
    reader.feed(ftyp + (1).to_bytes(4, "big") + b"free")
    reader.feed(free)
    assert reader.read(4096) == b"" and reader.failed is not None
    assert source.pulled == 0


# ---- frame preprocessing: the server decodes, the model's processor resizes -------------------------


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth gradient with noise: JPEG-friendly, and its resize is not trivially uniform."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("h", "w"), [(360, 640), (480, 200), (97, 301)])
def test_server_frames_are_the_qwen_processors_resize(h, w):
    """Non-square frames keep their aspect ratio: what the ingest decoders hand the engine is the
    processor's own resize of the decoded image, so preprocessing it again changes nothing and
    equals preprocessing the original."""
    import av

    from casa_live.model.processor import QwenImageProcessor
    from casa_live.server.ingest import to_rgb

    proc = QwenImageProcessor(14, 2, image_size=None, min_pixels=56 * 56, max_pixels=448 * 448)
    limits = FrameLimits.for_processor(proc, 448, 4096, 4096)
    assert limits.resize is not None
    original = _scene(h, w, h + w)
    th, tw = proc.target_size(h, w)
    assert th % 28 == 0 and tw % 28 == 0 and th * tw <= 448 * 448
    assert abs(th / tw - h / w) < 0.25 * h / w  # the aspect ratio is kept (to the 28-pixel grid)
    expected, grid = proc.process(original)
    assert grid == (th // 14, tw // 14)
    # images (PNG is lossless: the original's pixels; JPEG: Pillow's full decode, no draft mode)
    jpeg_bytes = jpeg(original)
    for payload, source in ((png(original), original), (jpeg_bytes, None)):
        frame = decode_image(payload, limits)
        if source is None:
            source = np.asarray(PIL.Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"))
        assert frame.shape == (th, tw, 3) and frame.dtype == np.uint8
        assert np.array_equal(frame, proc.resize(source))
        torch.testing.assert_close(proc(frame), proc(source), rtol=0, atol=0)
    torch.testing.assert_close(proc(decode_image(png(original), limits)), expected, rtol=0, atol=0)
    # decoded video (containers and packets share to_rgb): converted at full size, then resized
    vf = av.VideoFrame.from_ndarray(original, format="rgb24").reformat(format="yuv420p")
    frame = to_rgb(vf, limits)
    assert frame.shape == (th, tw, 3)
    rgb = vf.reformat(format="rgb24").to_ndarray()
    torch.testing.assert_close(proc(frame), proc(rgb), rtol=0, atol=0)
    # the square processor of the bundled model keeps its square input
    square = FrameLimits(24, 4096, 4096)
    assert decode_image(png(original), square).shape == (24, 24, 3)
    assert to_rgb(vf, square).shape == (24, 24, 3)


def test_engine_sizes_the_image_buffer_for_the_pixel_budget():
    from casa_live.model.checkpoint.toy import toy_generation_config, toy_model, word_tokenizer
    from casa_live.model.engine.engine import Engine

    model = toy_model("test-tiny", seed=0)
    model.config.processor = "qwen"
    tok = word_tokenizer(model.config.lm.vocab)
    engine = Engine(model, tok, toy_generation_config(), max_sessions=1, max_pixels=40 * 40)
    assert engine.processor.max_tokens == 25  # 40^2 pixels in 8-pixel units
    assert engine.state.casa.image_tokens == 25
    h, w = engine.processor.target_size(30, 200)  # wide: the budget, not a square, bounds it
    assert w > h and h * w <= 40 * 40
    row = engine.open("red circle")
    events = list(engine.caption(row, _scene(30, 200, 1)))
    assert events[-1].done and events[-1].reason in ("stop", "length")
    assert int(engine.state.casa.n_img[row]) == (h // 8) * (w // 8)
