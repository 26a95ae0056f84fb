"""deploy/aws/ (issue 12.7): the IAM policy names exactly the S3 actions the relay's code uses (found by reading
the S3 client calls in the source, so a new call without its permission fails here), on the bucket and the
prefix only; the lifecycle rule aborts incomplete multipart uploads under that prefix."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
AWS = ROOT / "deploy" / "aws"
SOURCES = [ROOT / name for name in ("shared", "worker", "webhook")]

# boto3 S3 client method -> the IAM action it needs (AWS's "Actions, resources, and condition keys for S3").
IAM_ACTION = {
    "get_object": "s3:GetObject",
    "head_object": "s3:GetObject",
    "put_object": "s3:PutObject",
    "create_multipart_upload": "s3:PutObject",
    "upload_part": "s3:PutObject",
    "complete_multipart_upload": "s3:PutObject",
    "abort_multipart_upload": "s3:AbortMultipartUpload",
    "list_multipart_uploads": "s3:ListBucketMultipartUploads",
    "delete_object": "s3:DeleteObject",
    "head_bucket": "s3:ListBucket",
}
BUCKET_ACTIONS = {"s3:ListBucket", "s3:ListBucketMultipartUploads"}


def s3_calls() -> set[str]:
    """Methods called on an object named `s3` (`self.s3.put_object(...)`, `s3.head_bucket(...)`), and the
    operation of every `generate_presigned_url("get_object", ...)` (a presigned URL acts with the signer's rights)."""
    found: set[str] = set()
    for folder in SOURCES:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                owner = node.func.value
                owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if owner_name != "s3":
                    continue
                if node.func.attr == "generate_presigned_url":
                    first = node.args[0]
                    assert isinstance(first, ast.Constant), f"{path}: presigned operation must be a literal"
                    found.add(str(first.value))
                else:
                    found.add(node.func.attr)
    return found


def statements() -> list[dict[str, Any]]:
    policy = json.loads((AWS / "iam-policy.json").read_text())
    assert policy["Version"] == "2012-10-17"
    result: list[dict[str, Any]] = policy["Statement"]
    assert all(s["Effect"] == "Allow" and isinstance(s["Action"], list) for s in result)
    return result


def test_the_code_calls_only_s3_operations_this_test_knows() -> None:
    calls = s3_calls()
    assert {"put_object", "upload_part", "head_bucket", "get_object"} <= calls  # the scan does see the calls
    assert calls <= set(IAM_ACTION), f"add the IAM action of {calls - set(IAM_ACTION)} here and to the policy"


def test_the_policy_grants_exactly_the_actions_the_code_uses() -> None:
    granted = [action for s in statements() for action in s["Action"]]
    assert len(granted) == len(set(granted))
    assert set(granted) == {IAM_ACTION[call] for call in s3_calls()}
    assert not [a for a in granted if "*" in a]


def test_bucket_actions_on_the_bucket_object_actions_on_the_prefix() -> None:
    for statement in statements():
        resource = statement["Resource"]
        assert isinstance(resource, str) and resource.startswith("arn:aws:s3:::")
        if set(statement["Action"]) <= BUCKET_ACTIONS:
            assert "/" not in resource.removeprefix("arn:aws:s3:::")
        else:
            assert not set(statement["Action"]) & BUCKET_ACTIONS
            assert resource.endswith("/*") and resource.count("/") >= 2


def test_lifecycle_aborts_incomplete_multipart_uploads_under_the_prefix() -> None:
    rules = json.loads((AWS / "s3-lifecycle.json").read_text())["Rules"]
    [rule] = [r for r in rules if "AbortIncompleteMultipartUpload" in r]
    assert rule["Status"] == "Enabled"
    assert 1 <= rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] <= 7
    [objects] = [s["Resource"] for s in statements() if "s3:PutObject" in s["Action"]]
    prefix = objects.removeprefix("arn:aws:s3:::").split("/", 1)[1].removesuffix("*")
    assert rule["Filter"]["Prefix"] == prefix
    assert "Expiration" not in rule  # the videos themselves are never expired by this rule
