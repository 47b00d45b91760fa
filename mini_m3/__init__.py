"""mini_m3: a compact, readable PyTorch reproduction of Memory³ (arXiv 2407.01178).

Data flows one way: text -> Tokenizer -> encode_references -> ExplicitMemory -> MemoryBank -> Retriever
-> Memory3 (Eq. 4 attention) -> generate.
"""

from .config import Memory3Config
from .model import KVCache, Memory3, MemoryKV, ModelOutput
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["Memory3Config", "Memory3", "MemoryKV", "KVCache", "ModelOutput", "Tokenizer"]
