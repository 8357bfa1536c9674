"""``glowlab verify DATA``: every shard of a prepared data set checked against its manifest."""

from __future__ import annotations

from pathlib import Path

from glowlab.jobs.args import job_parser


def verify(root: str) -> dict:
    """Check every shard: present, of the recorded size and sha256, every sample decodable and in range.

    Returns ``{"shards", "images", "problems"}``; raises ``ValueError`` listing the broken shards
    (running the same ``glowlab prepare`` again rebuilds exactly those).
    """
    from glowlab.data.shards import DataError, _is_url, decode, iter_tar, read_manifest

    manifest = read_manifest(root)
    shape, classes = tuple(manifest["image_shape"]), manifest.get("num_classes")
    shards = images = 0
    problems: list[str] = []
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            shards += 1
            url = f"{root.rstrip('/')}/{shard['name']}"
            try:
                if not _is_url(root):
                    path = Path(url)
                    if not path.is_file():
                        raise DataError(f"{url}: missing")
                    if path.stat().st_size != shard["size"]:
                        raise DataError(f"{url}: {path.stat().st_size} bytes, the manifest says {shard['size']}")
                for raw in iter_tar(url, shard["count"], shard["sha256"]):
                    decode(raw, manifest["payload"], shape, classes, int(manifest["n_bins"]))
                    images += 1
            except DataError as exn:
                problems.append(f"{split}: {exn}")
    result = {"data": root, "shards": shards, "images": images, "problems": problems}
    if problems:
        raise ValueError(
            f"{root}: {len(problems)} of {shards} shards are broken; running the same glowlab prepare again "
            "rebuilds them:\n  " + "\n  ".join(problems)
        )
    print(f"{root}: {shards} shards, {images} images: sizes, sha256 and every image as the manifest says")
    return result


def main(argv: list[str]) -> dict:
    """``glowlab verify DATA``: check every shard of a prepared data set against its manifest."""
    parser = job_parser("glowlab verify", verify.__doc__)
    parser.add_argument("data", help="prepared data folder (or URL / pipe: prefix)")
    args = parser.parse_args(argv)
    return verify(args.data)
