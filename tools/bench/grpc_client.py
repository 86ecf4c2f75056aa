"""`specserve bench` targets on the gRPC API (`--target NAME=grpc://HOST:9000`): the same workloads and
measurements as HTTP targets, so one run compares the two front ends of one server."""

from __future__ import annotations

import grpc

from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc


class GrpcBenchClient:
    def __init__(self, url: str, api_key: str | None):
        self.target = url.removeprefix("grpc://")
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def models(self) -> list[str]:
        reply = await self.stub.ListModels(pb.ListModelsRequest(), metadata=self.metadata, timeout=30)
        return [m.id for m in reply.models]

    async def stream(self, model: str, messages: list[dict[str, str]], settings, res, t0: float) -> None:
        """Fill `res` (a bench RequestResult) from one streamed Generate call."""
        if settings.endpoint == "completions":
            prompt = {"text": "\n\n".join(m["content"] for m in messages)}
        else:
            prompt = {"chat": pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages])}
        request = pb.GenerateRequest(model=model, sampling=pb.SamplingParams(
            temperature=settings.temperature, max_tokens=settings.max_tokens), **prompt)
        try:
            async for chunk in self.stub.Generate(request, metadata=self.metadata, timeout=settings.timeout):
                if chunk.text:
                    res.add_text(chunk.text, t0)
                if chunk.finish_reason:
                    u = chunk.usage
                    res.finish_reason = pb.FinishReason.Name(chunk.finish_reason).removeprefix("FINISH_REASON_").lower()
                    res.usage_reported, res.done = True, True
                    res.output_tokens, res.prompt_tokens = u.completion_tokens, u.prompt_tokens
                    res.cached_tokens, res.imported_tokens = u.cached_tokens, u.imported_tokens
                    res.draft_tokens, res.accepted_tokens = u.draft_tokens, u.accepted_tokens
                    res.spec_rounds = u.spec_rounds
        except grpc.aio.AioRpcError as err:
            res.error, res.detail = f"gRPC {err.code().name}", (err.details() or "")[:300]

    async def aclose(self) -> None:
        await self.channel.close()
