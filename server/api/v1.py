"""The v1 API object every resource module registers its operations on."""

from server.api.registry import Api

v1 = Api("api_v1", "/api/v1")
