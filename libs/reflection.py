"""Server reflection that carries the protos' comments, so `grpcurl describe` shows them.

grpcio's reflection serves descriptors as the generated modules hold them, which
keeps no comments. `make stubs` also writes every proto with its source info to
`tokensend/descriptors.binpb`; the file descriptors reflection answers with are
swapped for those.
"""

from __future__ import annotations

import logging
from importlib import resources

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

log = logging.getLogger(__name__)

DESCRIPTOR_SET = "descriptors.binpb"


def documented_files() -> dict[str, bytes]:
    """Each proto file's descriptor with its comments, by file name; empty when the set is missing."""
    try:
        raw = (resources.files("tokensend") / DESCRIPTOR_SET).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError):
        log.warning("%s is missing (`make stubs` writes it): reflection serves no comments", DESCRIPTOR_SET)
        return {}
    files = descriptor_pb2.FileDescriptorSet.FromString(raw).file
    for file in files:
        _without_json_names(file.message_type)
    return {file.name: file.SerializeToString() for file in files}


def _without_json_names(messages) -> None:  # noqa: ANN001 - a repeated DescriptorProto
    """protoc writes each field's JSON name into the set, the generated modules do not: with them,
    grpcurl would print `anonymousId` where it prints `anonymous_id`. Only the comments are added."""
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _without_json_names(message.nested_type)


class DocumentedReflection(ReflectionServicer):
    """grpcio's reflection, each file descriptor it answers with replaced by its documented version."""

    def __init__(self, service_names: list[str], documented: dict[str, bytes]) -> None:
        super().__init__(service_names)
        self._documented = documented

    def _file_by_filename(self, request, filename):  # noqa: ANN001, ANN202 - grpcio's signature
        return self._with_comments(super()._file_by_filename(request, filename))

    def _file_containing_symbol(self, request, fully_qualified_name):  # noqa: ANN001, ANN202
        return self._with_comments(super()._file_containing_symbol(request, fully_qualified_name))

    def _file_containing_extension(self, request, containing_type, extension_number):  # noqa: ANN001, ANN202
        return self._with_comments(super()._file_containing_extension(request, containing_type, extension_number))

    def _with_comments(self, response):  # noqa: ANN001, ANN202
        files = response.file_descriptor_response.file_descriptor_proto
        for i, raw in enumerate(files):
            documented = self._documented.get(descriptor_pb2.FileDescriptorProto.FromString(raw).name)
            if documented is not None:
                files[i] = documented
        return response


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    names = [*service_names, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(DocumentedReflection(names, documented_files()), server)
