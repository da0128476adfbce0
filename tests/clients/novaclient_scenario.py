"""python-novaclient driving toastgate's v2 API, as the README tells a team
to configure a stock client: the gateway as the compute endpoint, the team
JWT as the token.

Run by tests/stock_clients.rs: argv = gateway URL, a JWT of `platform`, then
the image, flavor and network ids. Prints one JSON object: each step's
outcome, for the Rust test to check.
"""

import json
import sys
import time

try:
    from keystoneauth1 import session
    from keystoneauth1.token_endpoint import Token
    from novaclient import client, utils
    from novaclient.v2 import shell
except ImportError:
    sys.exit("python3 module `novaclient` missing: pip install python-novaclient (.ci/run does)")

gateway, jwt, IMAGE, FLAVOR, NETWORK = sys.argv[1:6]
endpoint = f"{gateway}/v2/web"
nova = client.Client(
    "2.1",
    session=session.Session(auth=Token(endpoint, jwt)),
    endpoint_override=endpoint,
)

out = {}


def step(name, call):
    try:
        out[name] = {"ok": call()}
    except Exception as e:  # the test reads what the client made of the error
        out[name] = {"error": type(e).__name__, "message": str(e)}


# What `nova boot --flavor ...` does: by id (GET flavors/{id}), then by name
# (a list with is_public=None).
step("flavor_by_id", lambda: shell._find_flavor(nova, FLAVOR).name)
step("flavor_by_name", lambda: shell._find_flavor(nova, "t2.c1m1").id)
step("flavors_all", lambda: len(nova.flavors.list(is_public=None)))
step("keypair", lambda: nova.keypairs.create("nova-key").name)
server = nova.servers.create(
    "nova-vm",
    None,
    shell._find_flavor(nova, FLAVOR),
    key_name="nova-key",
    nics=[{"net-id": NETWORK}],
    block_device_mapping_v2=[{
        "boot_index": 0, "uuid": IMAGE, "source_type": "image",
        "destination_type": "volume", "volume_size": 20, "delete_on_termination": True,
    }],
)


def active():
    for _ in range(300):
        s = nova.servers.get(server.id)
        if s.status == "ACTIVE":
            return s.status
        time.sleep(0.1)
    return nova.servers.get(server.id).status


step("active", active)
step("listed", lambda: [s.name for s in nova.servers.list(search_opts={"name": "nova-"})])
step("found", lambda: utils.find_resource(nova.servers, "nova-vm").id == server.id)
step("zones", lambda: sorted(z.zoneName for z in nova.availability_zones.list(detailed=False)))
step("delete", lambda: (nova.servers.delete(server.id), None)[1])
step("keypair_delete", lambda: (nova.keypairs.delete("nova-key"), None)[1])

print(json.dumps(out))
