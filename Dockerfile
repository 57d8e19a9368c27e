# Switchboard server image, serving the demo model and its four demo adapters on port 8000.
#   CPU (default):  docker build -t switchboard .                            docker run -p 8000:8000 switchboard
#   CUDA:           docker build --build-arg VARIANT=cuda -t switchboard:cuda .
#                   docker run --gpus all -p 8000:8000 switchboard:cuda
# Serve your own checkpoint: mount it and pass the serve flags, e.g.
#   docker run -p 8000:8000 -v /models/llama:/models/llama:ro switchboard --model /models/llama
# Packages come at the exact versions of requirements/$VARIANT.txt (the lock CI passed with); the CPU variant takes
# torch's CPU build from PyTorch's CPU index, the CUDA variant PyPI's CUDA build with its libraries.
# tests/test_dockerfile.py replays the COPY list and the RUN steps below into a temporary directory.
FROM python:3.11-slim-bookworm

ARG VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# g++ compiles the C++ CPU kernels (torch's cpp_extension, with ninja from pip).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group switchboard

WORKDIR /app

# Dependencies before the code, so that a code change reuses this layer.
COPY requirements requirements
RUN pip install "pip==26.3" \
    && if [ "$VARIANT" = cuda ]; then pip install -c requirements/cuda.txt torch; \
       else pip install -c requirements/cpu.txt --extra-index-url "$TORCH_CPU_INDEX" torch; fi \
    && pip install -c "requirements/$VARIANT.txt" setuptools

COPY pyproject.toml README.md ./
COPY serving serving
COPY adapters_store adapters_store
COPY kernels kernels
COPY loadtest loadtest
COPY training training
COPY bench bench
RUN pip install -c "requirements/$VARIANT.txt" --no-build-isolation .

USER 10001
WORKDIR /home/switchboard
# Built once here instead of at every container start: the demo checkpoint, its seeded adapters, and the C++
# kernels (compiled for this build machine's CPU; a host with other CPU flags builds its own at first start).
RUN switchboard demo-model --out demo-model \
    && switchboard demo-adapters --model demo-model --out demo-adapters \
    && switchboard build-kernels

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["switchboard", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "demo-model", "--adapter", "demo-lora=demo-adapters/demo-lora", \
     "--adapter", "demo-krona=demo-adapters/demo-krona", "--adapter", "demo-ia3=demo-adapters/demo-ia3", \
     "--adapter", "demo-prefix=demo-adapters/demo-prefix"]
