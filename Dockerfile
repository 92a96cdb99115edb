# fusionserve: multi-stage build. Choose the torch build at build time:
#   CPU:  docker build -t fusionserve .   (PyPI's default torch wheel for the pinned version)
#   CUDA: docker build --build-arg PIP_EXTRA_INDEX_URL=<your CUDA wheel index> -t fusionserve:cuda .
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY app ./app
COPY host ./host
COPY media ./media
COPY models ./models
COPY training ./training
RUN pip install --upgrade pip \
 && pip install -c constraints.txt ".[video,backbones]" \
 && python -c "import app.main, media, host, models; print('import ok')"

FROM ${BASE_IMAGE} AS runtime
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL
# PYTHONSAFEPATH: `python -m app` never looks for the packages in the folder it starts in
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONSAFEPATH=1 \
    FUSIONSERVE_HOST=0.0.0.0 \
    FUSIONSERVE_PORT=8000
# jemalloc serves malloc, keeping its freed pages for reuse (no decay): under sustained load its heap
# stays at the working set where glibc's fragments; the server purges it once idle (docs/performance.md)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(ls /usr/lib/*-linux-gnu/libjemalloc.so.2)" /usr/lib/libjemalloc.so.2
ENV LD_PRELOAD=/usr/lib/libjemalloc.so.2 \
    MALLOC_CONF=dirty_decay_ms:-1
RUN useradd --system --uid 10001 --create-home --home-dir /home/fusionserve fusionserve
COPY --from=build /opt/venv /opt/venv
USER fusionserve
WORKDIR /home/fusionserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('FUSIONSERVE_PORT', '8000'), timeout=2)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "app"]
