"""Facts that several modules share: file names, format ids, reason codes, normalisation.

Each value is defined here once and imported everywhere else, so a renamed file or a
bumped format id cannot drift between the writer and its readers.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- format ids
# Bump the number when a reader of the old layout would misread the new one.
# /4 adds the frame provenance columns group, frame, timestamp, orientation; /3 indexes are still
# read (each row its own group, no frames).
SHARDS_FORMAT = "dataeff-shards/4"
EMBEDDINGS_FORMAT = "dataeff-embeddings/1"
SELECTION_FORMAT = "dataeff-selection/1"
# /2 adds "groups" (the groups of a group-aware split, or null); /1 files are still read.
SPLIT_FORMAT = "dataeff-split/2"
SPLIT_FORMATS_READ = ("dataeff-split/1", SPLIT_FORMAT)
TRUTH_FORMAT = "dataeff-truth/1"
DEMO_FORMAT = "dataeff-demo/1"
# /2 is a timm local-dir folder (config.json + model.safetensors); /1 exports are still read.
ENCODER_FORMAT = "dataeff-encoder/2"
MAE_FORMAT = "dataeff-mae/1"
PRETRAIN_FORMAT = "dataeff-pretrain/1"
FINETUNE_FORMAT = "dataeff-finetune/1"
CELL_FORMAT = "dataeff-cell/1"
SWEEP_FORMAT = "dataeff-sweep/1"
REPORT_FORMAT = "dataeff-report/1"
OVERLAP_FORMAT = "dataeff-overlap/1"
PROVENANCE_FORMAT = "dataeff-provenance/1"
CHECKPOINT_DIGEST_FORMAT = "dataeff-checkpoint-digest/1"

# --------------------------------------------------------------------------- file names
CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"
INDEX_NAME = "index.parquet"
SELECTION_NAME = "selection.parquet"
EMBEDDINGS_HEADER = "header.json"
SPLIT_NAME = "split.json"
PER_IMAGE_NAME = "per_image.csv"
TRUTH_NAME = "pool_truth.csv"
#: The encoder export, relative to a pre-training output: a timm model folder, so
#: ``timm.create_model("local-dir:<out>/encoder", pretrained=True)`` loads it.
ENCODER_DIR = "encoder"
ENCODER_WEIGHTS = f"{ENCODER_DIR}/model.safetensors"
ENCODER_META = f"{ENCODER_DIR}/config.json"
#: The ``dataeff-encoder/1`` export files, beside each other in the output; still read.
LEGACY_ENCODER_WEIGHTS = "encoder.safetensors"
LEGACY_ENCODER_META = "encoder.json"
MAE_CKPT = "mae.ckpt"
CHECKPOINT_DIR = "checkpoints"
#: Beside every checkpoint ``<name>``: ``<name>.digest.json``, the size and sha256 of its file(s).
CHECKPOINT_DIGEST_SUFFIX = ".digest.json"
RESULTS_NAME = "results.json"
BEST_WEIGHTS = "model.safetensors"
CELL_NAME = "cell.json"
#: The lock file every stage holds in its output directory while it runs (``dataeff.lock``).
LOCK_NAME = ".dataeff.lock"
#: What a stage's output was made from: config digest and input identities (``dataeff.provenance``).
PROVENANCE_NAME = "provenance.json"

# --------------------------------------------------------------------------- quality
#: Per-image statistics computed at shard time and stored as index columns.
QUALITY_KEYS = ("mean", "std", "laplacian_var", "dark_frac", "bright_frac")
#: Per-image signatures computed at shard time (``dataeff.data.signatures``), index columns
#: since ``dataeff-shards/3``: decoded-pixel sha256 (hex), 64-bit pHash (int64, same bits),
#: 16 x 16 grayscale thumbnail (256 bytes, row-major).
SIGNATURE_KEYS = ("pixel_sha256", "phash", "thumb")
#: Invalid-frame reasons judged from those statistics, most specific first.
QUALITY_REASONS = ("dark", "overexposed", "blank", "blurred")
#: Invalid-sample reasons judged from the embeddings.
EMBEDDING_REASONS = ("outlier", "small_cluster")
#: Shard-time rejection reasons in ``index.parquet``.
REJECT_REASONS = ("truncated", "not_an_image", "too_small", "decompression_bomb")
#: Index reasons of multi-frame inputs (videos, DICOM): a whole file refused, or the index
#: row of a partly decoded file counting its lost frames (``frames_lost:<n>``, status rejected).
VIDEO_UNDECODABLE = "video_undecodable"
DICOM_UNREADABLE = "dicom_unreadable"
DICOM_NO_PIXELS = "dicom_no_pixels"
DICOM_UNSUPPORTED_SYNTAX = "dicom_unsupported_transfer_syntax"
FRAMES_LOST_PREFIX = "frames_lost:"
#: Index columns of frame provenance (since ``dataeff-shards/4``): the group a sample belongs to
#: (its video, its DICOM study, or for a still image its own source path), the frame number in
#: its file (-1 for a still image), its time in seconds (null when unknown), and the EXIF
#: orientation its pixels were turned by (1 = as stored).
PROVENANCE_KEYS = ("group", "frame", "timestamp", "orientation")
#: Rejection reasons of paths under ``src`` that are never read (``dataeff.data.integrity``):
#: a link that resolves to itself or to a folder above it, a link to nothing, a FIFO, socket
#: or device, a file or folder that cannot be opened, a file over ``max_bytes``.
SYMLINK_LOOP = "symlink_loop"
BROKEN_LINK = "broken_link"
NOT_A_REGULAR_FILE = "not_a_regular_file"
READ_ERROR = "read_error"
TOO_LARGE = "too_large"
#: Rejection reasons of files whose bytes fail a format check before decoding: a PNG chunk
#: whose CRC does not match, JPEG entropy data that libjpeg reports as corrupt.
BAD_CHECKSUM = "bad_checksum"
CORRUPT_DATA = "corrupt_data"
#: Index reason of a byte-identical copy of an earlier file (status ``duplicate``).
DUPLICATE_PREFIX = "exact_duplicate_of:"
#: ``dataeff index`` rejections: a WebDataset sample without a jpg/png/webp member, a key seen before.
NO_IMAGE_MEMBER = "no_image_member"
DUPLICATE_KEY = "duplicate_key"
KEPT = "kept"
#: A pool sample that is a copy or near-copy of a downstream image (removed for every method).
DOWNSTREAM_OVERLAP = "downstream_overlap"
NOT_SELECTED = "not_selected"
REDUNDANT_PREFIX = "redundant_of:"
#: A selection's per-sample reasons as one-byte codes (the position here), as the methods hold
#: them until the manifest is written (``manifest.Reasons``): code 0, "not dropped", is written
#: ``not_selected``; ``redundant_of:`` is completed with the key of the duplicated sample.
REASON_CODES = (NOT_SELECTED, KEPT, *QUALITY_REASONS, *EMBEDDING_REASONS, DOWNSTREAM_OVERLAP, REDUNDANT_PREFIX)

# --------------------------------------------------------------------------- normalisation
#: ImageNet channel statistics: timm ViTs and every dataeff encoder are trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------- selection directory
#: Sub-directory of a selection holding its generated samples (OptiDEL mosaics) as a shard set.
GENERATED_DIR = "generated"
