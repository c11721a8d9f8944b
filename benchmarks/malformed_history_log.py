import sys, time, os
sys.path.insert(0, ".")
os.environ["ACIP_PUBLIC"] = "1"
import gradio as gr
import app
from acip_core.studio import StudioConfig
import tempfile
art = sys.argv[1]
t = tempfile.mkdtemp()
demo = app.build_demo(StudioConfig(default_artifact=art, runs=t+"/runs", precomputed=t+"/pre", downloads=t+"/dl"))
_, url, _ = demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **app.launch_options())
from gradio_client import Client
c = Client(url, verbose=False)

name = "smollm2-135m-instruct (precomputed)"
bad = [dict(role="user", content=[dict(type="nonsense", foo="z" * 100)]) for _ in range(3000)]
import json; print("payload MB", len(json.dumps(bad))/1e6, file=sys.stderr)
try:
    c.predict(name, 1.0, name, 1.0, False, "hi", bad, [], 4, 1.15, "float32", api_name="/chat")
except Exception as e:
    print("ERR", str(e)[:300], file=sys.stderr)
bad2 = ["x" * 100] * 6000
try:
    c.predict(name, 1.0, name, 1.0, False, "hi", bad2, [], 4, 1.15, "float32", api_name="/chat")
except Exception as e:
    print("ERR", str(e)[:300], file=sys.stderr)
demo.close()
