"""The callback benchmark's baseline: a Flask app whose callback route reads the body and answers, nothing else.

Served by gunicorn with the project's own config (deploy/gunicorn.conf.py), so the workers, worker class and
recycling are the relay's.
"""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/callbacks/kling/<job_id>")
def callback(job_id: str) -> object:
    request.get_data()
    return jsonify(ok=True, applied=False, state="processing")
