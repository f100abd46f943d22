"""What the relations of synthetic suite version 3 (``gist_jax.data.synthetic_v3``) know:
month and day names (CLDR via ``babel``), countries with their codes, capitals, continents
and demonyms, cities, and English word tables (adjectives with their opposites,
comparatives and superlatives; adverbs; -ness nouns; verb forms; noun plurals).
"""

from __future__ import annotations

from babel import Locale
from babel.languages import get_official_languages
from babel.numbers import get_currency_name, get_territory_currencies
from num2words import num2words

from gist_jax.data.suite import Invalid


def words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def table(text: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(line.split(",")) for line in text.strip().splitlines())


# -- what the relations know ----------------------------------------------------------------

ENGLISH = Locale("en")
MONTHS: tuple[str, ...] = tuple(ENGLISH.months["format"]["wide"][i] for i in range(1, 13))
DAYS: tuple[str, ...] = tuple(ENGLISH.days["format"]["wide"][i] for i in range(7))  # Monday first
MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
SEASONS = words("winter winter spring spring spring summer summer summer autumn autumn "
                  "autumn winter")  # fmt: skip
# Languages that translation relations take as an argument: name -> CLDR locale.
LANGUAGES: dict[str, str] = {"French": "fr", "Spanish": "es", "German": "de", "Italian": "it"}
# English name -> (ISO code, capital, continent, demonym). Names are written out here
# rather than taken from CLDR, whose English names are not always the everyday ones.
COUNTRIES: dict[str, tuple[str, str, str, str]] = {
    row[0]: row[1:]
    for row in table("""
France,FR,Paris,Europe,French
Germany,DE,Berlin,Europe,German
Spain,ES,Madrid,Europe,Spanish
Italy,IT,Rome,Europe,Italian
Japan,JP,Tokyo,Asia,Japanese
China,CN,Beijing,Asia,Chinese
Brazil,BR,Brasilia,South America,Brazilian
Canada,CA,Ottawa,North America,Canadian
Mexico,MX,Mexico City,North America,Mexican
Russia,RU,Moscow,Europe,Russian
Egypt,EG,Cairo,Africa,Egyptian
Kenya,KE,Nairobi,Africa,Kenyan
Australia,AU,Canberra,Oceania,Australian
Argentina,AR,Buenos Aires,South America,Argentinian
Peru,PE,Lima,South America,Peruvian
Greece,GR,Athens,Europe,Greek
Portugal,PT,Lisbon,Europe,Portuguese
Sweden,SE,Stockholm,Europe,Swedish
Norway,NO,Oslo,Europe,Norwegian
Poland,PL,Warsaw,Europe,Polish
Turkey,TR,Ankara,Asia,Turkish
Ireland,IE,Dublin,Europe,Irish
Netherlands,NL,Amsterdam,Europe,Dutch
Austria,AT,Vienna,Europe,Austrian
Chile,CL,Santiago,South America,Chilean
Colombia,CO,Bogota,South America,Colombian
Nigeria,NG,Abuja,Africa,Nigerian
Thailand,TH,Bangkok,Asia,Thai
Vietnam,VN,Hanoi,Asia,Vietnamese
South Korea,KR,Seoul,Asia,Korean
Indonesia,ID,Jakarta,Asia,Indonesian
Morocco,MA,Rabat,Africa,Moroccan
Cuba,CU,Havana,North America,Cuban
Finland,FI,Helsinki,Europe,Finnish
Denmark,DK,Copenhagen,Europe,Danish
Hungary,HU,Budapest,Europe,Hungarian
Iran,IR,Tehran,Asia,Iranian
Ukraine,UA,Kyiv,Europe,Ukrainian
""")
}
CITIES: dict[str, str] = dict(
    table("""
Paris,France
Lyon,France
Berlin,Germany
Munich,Germany
Madrid,Spain
Barcelona,Spain
Rome,Italy
Milan,Italy
Tokyo,Japan
Osaka,Japan
Beijing,China
Shanghai,China
Moscow,Russia
Cairo,Egypt
Nairobi,Kenya
Sydney,Australia
Melbourne,Australia
Toronto,Canada
Lima,Peru
Athens,Greece
Lisbon,Portugal
Stockholm,Sweden
Oslo,Norway
Warsaw,Poland
Istanbul,Turkey
Dublin,Ireland
Amsterdam,Netherlands
Vienna,Austria
Seoul,South Korea
Bangkok,Thailand
Havana,Cuba
Helsinki,Finland
London,United Kingdom
Chicago,United States
Mumbai,India
Rio de Janeiro,Brazil
Buenos Aires,Argentina
Mexico City,Mexico
""")
)
# adjective, opposite, comparative, superlative
ADJECTIVES = table("""
hot,cold,hotter,hottest
big,small,bigger,biggest
tall,short,taller,tallest
fast,slow,faster,fastest
happy,sad,happier,happiest
hard,soft,harder,hardest
early,late,earlier,earliest
rich,poor,richer,richest
strong,weak,stronger,strongest
thick,thin,thicker,thickest
wide,narrow,wider,widest
high,low,higher,highest
full,empty,fuller,fullest
clean,dirty,cleaner,cleanest
wet,dry,wetter,wettest
loud,quiet,louder,loudest
good,bad,better,best
heavy,light,heavier,heaviest
deep,shallow,deeper,deepest
sweet,sour,sweeter,sweetest
warm,cool,warmer,warmest
young,old,younger,youngest
bright,dim,brighter,brightest
smooth,rough,smoother,smoothest
tight,loose,tighter,tightest
sharp,dull,sharper,sharpest
long,short,longer,longest
cheap,expensive,cheaper,cheapest
safe,dangerous,safer,safest
kind,cruel,kinder,kindest
easy,difficult,easier,easiest
calm,angry,calmer,calmest
quick,slow,quicker,quickest
""")
# adjective -> adverb, and -> noun in -ness (separate tables: not every adjective has both)
ADVERBS = dict(
    table("""
quick,quickly
slow,slowly
happy,happily
sad,sadly
loud,loudly
quiet,quietly
easy,easily
careful,carefully
good,well
bad,badly
soft,softly
kind,kindly
brave,bravely
calm,calmly
safe,safely
polite,politely
gentle,gently
warm,warmly
angry,angrily
honest,honestly
""")
)
NESS = dict(
    table("""
happy,happiness
sad,sadness
dark,darkness
kind,kindness
weak,weakness
soft,softness
calm,calmness
bright,brightness
sick,sickness
lazy,laziness
good,goodness
thick,thickness
ill,illness
empty,emptiness
fit,fitness
aware,awareness
fair,fairness
rude,rudeness
""")
)
# verb, past, -ing, past participle, third person singular
VERBS = table("""
go,went,going,gone,goes
eat,ate,eating,eaten,eats
see,saw,seeing,seen,sees
run,ran,running,run,runs
write,wrote,writing,written,writes
sing,sang,singing,sung,sings
swim,swam,swimming,swum,swims
drink,drank,drinking,drunk,drinks
take,took,taking,taken,takes
give,gave,giving,given,gives
speak,spoke,speaking,spoken,speaks
break,broke,breaking,broken,breaks
drive,drove,driving,driven,drives
fly,flew,flying,flown,flies
know,knew,knowing,known,knows
grow,grew,growing,grown,grows
throw,threw,throwing,thrown,throws
buy,bought,buying,bought,buys
bring,brought,bringing,brought,brings
think,thought,thinking,thought,thinks
teach,taught,teaching,taught,teaches
catch,caught,catching,caught,catches
sleep,slept,sleeping,slept,sleeps
keep,kept,keeping,kept,keeps
feel,felt,feeling,felt,feels
leave,left,leaving,left,leaves
meet,met,meeting,met,meets
sit,sat,sitting,sat,sits
stand,stood,standing,stood,stands
find,found,finding,found,finds
make,made,making,made,makes
tell,told,telling,told,tells
sell,sold,selling,sold,sells
win,won,winning,won,wins
begin,began,beginning,begun,begins
choose,chose,choosing,chosen,chooses
fall,fell,falling,fallen,falls
forget,forgot,forgetting,forgotten,forgets
ride,rode,riding,ridden,rides
walk,walked,walking,walked,walks
jump,jumped,jumping,jumped,jumps
play,played,playing,played,plays
cook,cooked,cooking,cooked,cooks
dance,danced,dancing,danced,dances
open,opened,opening,opened,opens
clean,cleaned,cleaning,cleaned,cleans
watch,watched,watching,watched,watches
paint,painted,painting,painted,paints
help,helped,helping,helped,helps
climb,climbed,climbing,climbed,climbs
""")
# noun, plural, with its indefinite article
NOUNS = table("""
apple,apples,an apple
box,boxes,a box
baby,babies,a baby
city,cities,a city
child,children,a child
mouse,mice,a mouse
knife,knives,a knife
leaf,leaves,a leaf
tooth,teeth,a tooth
foot,feet,a foot
man,men,a man
woman,women,a woman
bus,buses,a bus
church,churches,a church
dish,dishes,a dish
party,parties,a party
story,stories,a story
wolf,wolves,a wolf
potato,potatoes,a potato
tomato,tomatoes,a tomato
hero,heroes,a hero
glass,glasses,a glass
watch,watches,a watch
boy,boys,a boy
key,keys,a key
toy,toys,a toy
day,days,a day
family,families,a family
lady,ladies,a lady
bench,benches,a bench
fox,foxes,a fox
egg,eggs,an egg
island,islands,an island
orange,oranges,an orange
umbrella,umbrellas,an umbrella
owl,owls,an owl
house,houses,a house
horse,horses,a horse
garden,gardens,a garden
river,rivers,a river
""")
LETTERS = "abcdefghijklmnopqrstuvwxy"  # no "z": "the next letter" must exist
COUNT_WORDS = words("zero one two three four five six")


CAPITALS = frozenset(row[1] for row in COUNTRIES.values())


def roman(n: int) -> str:
    out = ""
    for value, symbol in zip(
        (1000, 900, 500, 400, 100, 90, 50, 40, 10, 9, 5, 4, 1),
        words("M CM D CD C XC L XL X IX V IV I"),
        strict=True,
    ):
        count, n = divmod(n, value)
        out += symbol * count
    return out


def later_letter(letter: str, n: int) -> str:
    index = LETTERS.index(letter) + n
    if not 0 <= index < len(LETTERS):
        raise Invalid
    return LETTERS[index]


def ordinal(n: int) -> str:
    return num2words(n, to="ordinal_num")


def official_language(country: str) -> str:
    languages = get_official_languages(COUNTRIES[country][0])
    if len(languages) != 1:  # several official languages: no single answer
        raise Invalid
    return ENGLISH.languages[languages[0]]


def currency(country: str) -> str:
    return get_currency_name(get_territory_currencies(COUNTRIES[country][0])[0], locale="en")
