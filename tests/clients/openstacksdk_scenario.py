"""A stock OpenStack client (openstacksdk) driving toastgate's v2 API.

Run by tests/stock_clients.rs: argv = gateway URL, then a JWT for each of
`platform` (web and batch), `readers` (reads only, on web). The SDK is
configured as the README tells a team to: the gateway as the compute
endpoint, the team JWT as the token. Prints one JSON object: each step's
outcome, for the Rust test to check.
"""

import json
import sys

try:
    import openstack
except ImportError:
    sys.exit("python3 module `openstacksdk` missing: pip install openstacksdk (.ci/run does)")

gateway, platform_jwt, readers_jwt = sys.argv[1:4]
IMAGE, FLAVOR, NETWORK, VOLUME = sys.argv[4:8]


def connect(project, token):
    endpoint = f"{gateway}/v2/{project}"
    return openstack.connect(
        auth_type="admin_token",
        auth={"endpoint": endpoint, "token": token},
        compute_endpoint_override=endpoint,
        region_name="KR1",
    )


out = {}


def step(name, call):
    try:
        out[name] = {"ok": call()}
    except Exception as e:  # the test reads what the SDK made of the error
        out[name] = {
            "error": type(e).__name__,
            "status": getattr(e, "status_code", None),
            "message": str(e),
        }


web = connect("web", platform_jwt)
# openstacksdk sends is_public=None on every flavor list.
step("flavors", lambda: sorted(f.name for f in web.compute.flavors()))
step("flavors_brief", lambda: len(list(web.compute.flavors(details=False))))
step("flavor_by_name", lambda: web.compute.find_flavor("t2.c1m1", ignore_missing=False).id)
step("flavor_get", lambda: web.compute.get_flavor(FLAVOR).name)
step("flavor_link", lambda: [
    l["href"] for l in web.compute.get(f"/flavors/{FLAVOR}").json()["flavor"]["links"] if l["rel"] == "self"
])
step("zones", lambda: sorted(z.name for z in web.compute.availability_zones()))
step("keypair_create", lambda: web.compute.create_keypair(name="sdk-key").private_key.startswith("-----BEGIN"))
step("keypair_get", lambda: web.compute.get_keypair("sdk-key").name)

server = web.compute.create_server(
    name="sdk-vm",
    image_id=IMAGE,
    flavor_id=FLAVOR,
    networks=[{"uuid": NETWORK}],
    key_name="sdk-key",
    block_device_mapping_v2=[{
        "boot_index": 0, "uuid": IMAGE, "source_type": "image",
        "destination_type": "volume", "volume_size": 20, "delete_on_termination": True,
    }],
)
step("server_active", lambda: web.compute.wait_for_server(server, interval=0.1, wait=30).status)
step("server_by_name", lambda: web.compute.find_server("sdk-vm", ignore_missing=False).id == server.id)
step("server_listed", lambda: [s.name for s in web.compute.servers()])
step("server_addresses", lambda: list(web.compute.get_server(server.id).addresses))


def action_then(status, act):
    def run():
        act()
        return web.compute.wait_for_server(
            web.compute.get_server(server.id), status=status, interval=0.1, wait=30
        ).status
    return run


step("stop", action_then("SHUTOFF", lambda: web.compute.stop_server(server)))
step("start", action_then("ACTIVE", lambda: web.compute.start_server(server)))
step("reboot", action_then("ACTIVE", lambda: web.compute.reboot_server(server, "SOFT")))
step("rename", lambda: web.compute.update_server(server, name="sdk-vm-2").name)
step("attach", lambda: web.compute.create_volume_attachment(server, volume_id=VOLUME).volume_id)
step("attachments", lambda: sorted(a.volume_id for a in web.compute.volume_attachments(server)))
step("detach", lambda: web.compute.delete_volume_attachment(server, VOLUME, ignore_missing=False))

readers = connect("web", readers_jwt)
step("readers_list", lambda: len(list(readers.compute.servers())))
step("readers_delete", lambda: readers.compute.delete_server(server.id, ignore_missing=False))

step("delete", lambda: web.compute.delete_server(server, ignore_missing=False))
step("deleted", lambda: web.compute.wait_for_delete(server, interval=0.1, wait=30).name)
step("gone", lambda: web.compute.find_server(server.id) is None)
step("keypair_delete", lambda: web.compute.delete_keypair("sdk-key", ignore_missing=False))

# The other project's credentials are an appkey (the v1.0 token API).
batch = connect("batch", platform_jwt)
step("batch_flavors", lambda: len(list(batch.compute.flavors())))
step("batch_servers", lambda: len(list(batch.compute.servers())))

print(json.dumps(out))
