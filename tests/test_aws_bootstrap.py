"""cluster.yaml through Ray's own AWS launcher code inside moto (an AWS emulator, in-process: no
network, dummy credentials): the IAM set-up that docs/cluster.md tells an account to run once,
then `prepare_config`, `validate_config`, `bootstrap_aws` and the node provider's `create_node`
for every node type, as `ray up` (the head) and the head's autoscaler (the workers) call them.
What a real account needs is then asked of the emulator: every node launches with an instance
profile whose role may write the bucket (an S3 write under the role's own credentials, with
moto's IAM enforcement on), the head's role may hand the workers their role and resolve their
image, spot options pass EC2's request validation, and the file holds no credentials.
"""

from __future__ import annotations

import copy
import json
import re
import shlex

import moto  # the AWS emulator (the dev extra): missing, the test fails, never skips
import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.launch

BUCKET = "your-bucket"  # the name in docs/cluster.md and examples/aws-iam/*.json
IAM_DOC = ROOT / "docs" / "cluster.md"


def documented_iam_calls() -> list[tuple[str, dict]]:
    """The `aws iam` lines of docs/cluster.md's set-up loop, for each role it loops over, as
    (operation, parameters) of boto3's IAM client: `create-role --role-name X` is
    create_role(RoleName=X), and a `file://PATH` value is the file's text."""
    text = IAM_DOC.read_text()
    loop = re.search(r"for who in ([\w ]+); do\n(.*?)\ndone", text, re.S)
    assert loop, "docs/cluster.md lost its IAM set-up loop"
    calls = []
    for who in loop.group(1).split():
        for line in loop.group(2).splitlines():
            words = shlex.split(line.replace("$who", who))
            assert words[:2] == ["aws", "iam"], line
            params = {}
            for flag, value in zip(words[3::2], words[4::2]):
                name = "".join(part.title() for part in flag.removeprefix("--").split("-"))
                params[name] = ((ROOT / value.removeprefix("file://")).read_text()
                                if value.startswith("file://") else value)
            calls.append((words[2].replace("-", "_"), params))
    return calls


@pytest.fixture
def aws(monkeypatch):
    """moto's emulated account in cluster.yaml's region, with AWS's managed policies loaded
    (Ray's default head role attaches two), and Ray's cached boto3 clients dropped before and
    after (they would keep talking to whichever endpoint they were made for)."""
    from ray.autoscaler._private.aws import utils

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "MOTO_IAM_LOAD_MANAGED_POLICIES": "true",
                       "AWS_DEFAULT_REGION": config["provider"]["region"]}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    utils.resource_cache.cache_clear()
    utils.client_cache.cache_clear()
    with moto.mock_aws():
        yield config["provider"]["region"]
    utils.resource_cache.cache_clear()
    utils.client_cache.cache_clear()


def launch_every_node_type(config: dict, region: str) -> dict[str, dict]:
    """Ray's bootstrap of CONFIG, then one node of every type created as Ray creates it (the
    head with the bootstrap's head-only fields, as `ray up`; workers from their node_config, as
    the autoscaler); returns {node type: EC2's description of the instance}."""
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    boot = bootstrap_aws(prepared)
    provider = AWSNodeProvider(boot["provider"], boot["cluster_name"])
    ec2 = boto3.client("ec2", region_name=region)
    launched = {}
    for name, node_type in boot["available_node_types"].items():
        head = name == boot["head_node_type"]
        node_config = {**boot["head_node"], **node_type["node_config"]} if head else \
            copy.deepcopy(node_type["node_config"])
        created = provider.create_node(node_config, {"ray-node-type": "head" if head else
                                                     "worker", "ray-user-node-type": name}, 1)
        (instance_id,) = created
        reservation = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]
        launched[name] = {**reservation["Instances"][0], "requested": node_config}
    return launched


def role_of(instance: dict) -> dict:
    """The IAM role in an instance's instance profile."""
    import boto3

    iam = boto3.client("iam")
    name = instance["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
    (role,) = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
    return role


def role_allows(role: dict, action: str, resource: str) -> bool:
    """moto's IAM policy evaluation of ROLE's inline and attached policies (any Deny wins)."""
    import boto3
    from moto.iam.access_control import IAMPolicy, PermissionResult

    iam = boto3.client("iam")
    name = role["RoleName"]
    documents = [iam.get_role_policy(RoleName=name, PolicyName=p)["PolicyDocument"]
                 for p in iam.list_role_policies(RoleName=name)["PolicyNames"]]
    for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
        version = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]["DefaultVersionId"]
        documents.append(iam.get_policy_version(PolicyArn=attached["PolicyArn"],
                                                VersionId=version)["PolicyVersion"]["Document"])
    results = [IAMPolicy(json.dumps(d) if isinstance(d, dict) else d)
               .is_action_permitted(action, resource) for d in documents]
    return PermissionResult.DENIED not in results and PermissionResult.PERMITTED in results


def write_as(role: dict, region: str) -> None:
    """An S3 write under ROLE's own temporary credentials, with moto enforcing IAM."""
    import boto3
    from moto.core.authorization import enable_iam_authentication

    creds = boto3.client("sts").assume_role(RoleArn=role["Arn"], RoleSessionName="node")
    keys = creds["Credentials"]
    s3 = boto3.client("s3", region_name=region, aws_access_key_id=keys["AccessKeyId"],
                      aws_secret_access_key=keys["SecretAccessKey"],
                      aws_session_token=keys["SessionToken"])
    with enable_iam_authentication():
        s3.put_object(Bucket=BUCKET, Key="cmg/stage1/probe", Body=b"written by a node")


def test_every_node_type_launches_able_to_write_the_bucket(aws):
    import boto3

    region = aws
    iam = boto3.client("iam")
    for operation, params in documented_iam_calls():  # what docs/cluster.md has an account run
        getattr(iam, operation)(**params)
    boto3.client("s3", region_name=region).create_bucket(
        Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": region})
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    launched = launch_every_node_type(config, region)
    assert set(launched) == set(config["available_node_types"])

    head = launched.pop(config["head_node_type"])
    for name, instance in {config["head_node_type"]: head, **launched}.items():
        assert "IamInstanceProfile" in instance, (
            f"node type {name} launches without an instance profile: its trials cannot "
            f"write s3://{BUCKET}")
        write_as(role_of(instance), region)  # raises AccessDenied if the role may not

    head_role = role_of(head)
    for name, instance in launched.items():  # the head's autoscaler launches every worker
        worker_role = role_of(instance)
        assert role_allows(head_role, "iam:PassRole", worker_role["Arn"]), (
            f"the head's role {head_role['RoleName']} may not pass {worker_role['RoleName']} "
            f"to {name} nodes: EC2 refuses the launch")
        image = instance["requested"]["ImageId"]
        if image.startswith("resolve:ssm:"):  # EC2 reads it as the launching role
            parameter = image.removeprefix("resolve:ssm:")
            arn = f"arn:aws:ssm:{region}::parameter{parameter}"
            assert role_allows(head_role, "ssm:GetParameters", arn), (
                f"{name}: the head's role may not read {parameter}: the launch fails")
        else:
            assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image), f"{name}: image id {image!r}"
        if "InstanceMarketOptions" in instance["requested"]:
            assert instance.get("InstanceLifecycle") == "spot", name


def test_no_credentials_in_the_file():
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"aws_(secret_)?access_key|aws_session_token|AKIA[0-9A-Z]{16}|"
                         r"BEGIN .*PRIVATE KEY|arn:aws:iam::\d{12}:", text, re.I)
