import time, json, urllib.request
from pathlib import Path
if __name__ == "__main__":
    from trace.rollout.server import VLLMServer, server_settings
    t = time.time()
    s = VLLMServer("/tmp/vllm_helper/tiny_eos", server_settings({"max_model_len": 512}, "float32"), Path("/tmp/vllm_helper/srv"))
    print("up", s.startup_s, s.base_url, flush=True)
    body = json.dumps({"model": s.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0.0,
                       "chat_template_kwargs": {"enable_thinking": False}}).encode()
    req = urllib.request.Request(s.base_url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    print(json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["message"])
    pid = s.proc.pid
    s.stop()
    print("running after stop:", s.running, s.proc.returncode)
