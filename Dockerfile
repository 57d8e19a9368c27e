# CPU image of the Switchboard server. On a GPU host, the same torch pin installs a CUDA build.
FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md Makefile ./
COPY serving serving
COPY adapters_store adapters_store
COPY kernels kernels
COPY loadtest loadtest
RUN pip install --no-cache-dir "torch==2.13.0" && pip install --no-cache-dir -e .
# The demo model is built at first start unless a model directory is mounted and passed with --model.
EXPOSE 8000
ENTRYPOINT ["switchboard", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "demo"]
