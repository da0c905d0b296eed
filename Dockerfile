# ftgate image: the API, the workers and the reaper of deploy/compose.yaml. CPU by default:
#   docker build -t ftgate:cpu .
# GPU: the CUDA build of the same torch version. Its wheels bring the CUDA runtime libraries with them, so
# the base image stays the same and the host needs only the NVIDIA driver and container toolkit:
#   docker build -t ftgate:gpu --build-arg VARIANT=gpu [--build-arg CUDA=cu128] .
# VARIANT picks the stage torch-<VARIANT> below; BuildKit builds only that one.
ARG VARIANT=cpu

FROM python:3.11-slim AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the index of the variant, pinned to the version pyproject.toml requires, without its
# requirements; the project install then finds torch satisfied and takes everything else, torch's
# requirements included, from PyPI at the versions constraints.txt pins (the set CI last passed with).
FROM python AS torch-cpu
RUN pip install --no-deps "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu

FROM python AS torch-gpu
ARG CUDA=cu128
RUN pip install --no-deps "torch==2.13.0" --index-url https://download.pytorch.org/whl/${CUDA}

FROM torch-${VARIANT} AS ftgate
WORKDIR /opt/ftgate
COPY pyproject.toml README.md constraints.txt ./
COPY alignment ./alignment
COPY auditing ./auditing
COPY gate ./gate
# The deploy extra adds gunicorn, the API's server in deploy/start-api.sh.
RUN pip install -c constraints.txt ".[deploy]"
COPY deploy ./deploy

# The state volume is mounted at /var/lib/ftgate; a new named volume takes this folder's owner.
RUN useradd --create-home --uid 10001 ftgate && mkdir -p /var/lib/ftgate && chown ftgate /var/lib/ftgate
USER ftgate
WORKDIR /home/ftgate
ENTRYPOINT ["ftgate"]
CMD ["--help"]
