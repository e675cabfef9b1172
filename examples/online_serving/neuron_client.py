# The user guide's client: list the served model, then one chat completion with
# top_k through extra_body. Start the server first:
#   examples/online_serving/neuron_server.sh
# Usage: python examples/online_serving/neuron_client.py [--stream] [--base-url URL]
import argparse

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--stream", action="store_true")
parser.add_argument("--base-url", default="http://localhost:8080/v1")
parser.add_argument("--api-key", default="EMPTY")
args = parser.parse_args()

# Client setup
client = OpenAI(api_key=args.api_key, base_url=args.base_url)
models = client.models.list()
model_name = models.data[0].id

# Sampling parameters (the server above has max_model_len=128)
max_tokens = 64
temperature = 1.0
top_p = 1.0
top_k = 50
stream = args.stream

# Chat completion request
prompt = "Hello, my name is Llama "
response = client.chat.completions.create(
    model=model_name,
    messages=[{"role": "user", "content": prompt}],
    max_tokens=int(max_tokens),
    temperature=float(temperature),
    top_p=float(top_p),
    stream=stream,
    extra_body={"top_k": top_k},
)

# Parse the response
generated_text = ""
if stream:
    for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content is not None:
            generated_text += chunk.choices[0].delta.content
else:
    generated_text = response.choices[0].message.content

print(generated_text)
