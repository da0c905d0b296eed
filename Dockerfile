# ftgate image. CPU by default:
#   docker build -t ftgate .
# GPU (CUDA build of the same torch version):
#   docker build -t ftgate:gpu --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# A CUDA base image must provide python3.11 (or set PYTHON to its interpreter).
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PYTHON=python3
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/ftgate
RUN ${PYTHON} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the index matching the image (CPU or CUDA), pinned to the version
# pyproject.toml requires; the project install then finds it satisfied.
RUN pip install "torch==2.13.0" --index-url ${TORCH_INDEX}

COPY pyproject.toml README.md ./
COPY alignment ./alignment
COPY auditing ./auditing
COPY gate ./gate
RUN pip install .

RUN useradd --create-home --uid 10001 ftgate
USER ftgate
WORKDIR /home/ftgate
ENTRYPOINT ["ftgate"]
CMD ["--help"]
